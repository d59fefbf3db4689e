"""DeepSeek-VL2 projector: 2x2 pixel-unshuffle, then Linear-GELU-Linear to the LM width; then each image's
views are laid out as in ``nemo_pixellm.tiling`` (``image_token_sequence``): global view, learned view separator,
local mosaic, with a learned newline embedding closing every token row.

``position_code`` (the tiny variant) writes ``tiling.view_position_code`` into each token's last channels
(``tiling.with_position_code``): a tower trained from scratch on captions loses its tokens' places
(benchmarks/position_probe.py), and a fixed code cannot be trained away; a pretrained SigLIP keeps them in its
features, so the real variants leave it off."""

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule

from nemo_pixellm.models.specs import projector_mlp_submodules
from nemo_pixellm.tiling import image_token_sequence, pixel_unshuffle, with_position_code


class PixelProjector(MegatronModule):
    """Vision features [views, gh, gw, c_vision] -> LM tokens of every image, in sequence order."""

    def __init__(self, config, vision_width: int, downsample: int = 2, position_code: bool = False, pg_collection=None):
        super().__init__(config=config)
        self.downsample = downsample
        self.position_code = position_code
        self.mlp = MultimodalProjector(
            config, projector_mlp_submodules(getattr(config, "use_te", None)), "mlp",
            input_size=vision_width * downsample * downsample, pg_collection=pg_collection,
        )
        self.image_newline = torch.nn.Parameter(torch.randn(config.hidden_size) * config.init_method_std)
        self.view_separator = torch.nn.Parameter(torch.randn(config.hidden_size) * config.init_method_std)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """[views, gh, gw, c_vision] -> [views, s, s, hidden]."""
        grid = pixel_unshuffle(vision_features, self.downsample)
        n, rows, cols, width = grid.shape
        tokens = self.mlp(grid.reshape(n * rows * cols, 1, width))  # Megatron linears take [s, b, h]
        tokens = tokens.reshape(n, rows, cols, -1)
        return with_position_code(tokens) if self.position_code else tokens

    def forward(self, vision_features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """``grids``: [images, 2] (cols, rows) of local tiles per image ((0, 0): global view only); the
        views arrive per image as global, then local tiles row by row. Returns [tokens, hidden]."""
        return image_token_sequence(self.project(vision_features), grids, self.image_newline, self.view_separator)
