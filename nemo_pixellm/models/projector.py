"""DeepSeek-VL2 projector: 2x2 pixel-unshuffle, then Linear-GELU-Linear to the LM width, then the
per-row learned newline embedding (and a learned view separator used between views)."""

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule

from nemo_pixellm.models.specs import projector_mlp_submodules


def pixel_unshuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[n, h, w, c] -> [n, ceil(h/f), ceil(w/f), c*f*f]; odd grids (27 at 384/14) are zero-padded first."""
    n, h, w, c = features.shape
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        features = F.pad(features, (0, 0, 0, pad_w, 0, pad_h))
        h, w = h + pad_h, w + pad_w
    features = features.reshape(n, h // factor, factor, w // factor, factor, c)
    return features.permute(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, factor * factor * c)


class PixelProjector(MegatronModule):
    """Vision features [n, gh, gw, c_vision] -> LM tokens [n, rows, cols + 1, hidden] (newline per row)."""

    def __init__(self, config, vision_width: int, downsample: int = 2, pg_collection=None):
        super().__init__(config=config)
        self.downsample = downsample
        self.mlp = MultimodalProjector(
            config, projector_mlp_submodules(getattr(config, "use_te", None)), "mlp",
            input_size=vision_width * downsample * downsample, pg_collection=pg_collection,
        )
        self.image_newline = torch.nn.Parameter(torch.randn(config.hidden_size) * config.init_method_std)
        self.view_separator = torch.nn.Parameter(torch.randn(config.hidden_size) * config.init_method_std)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        grid = pixel_unshuffle(vision_features, self.downsample)
        n, rows, cols, width = grid.shape
        tokens = self.mlp(grid.reshape(n * rows * cols, 1, width))  # Megatron linears take [s, b, h]
        hidden = tokens.shape[-1]
        tokens = tokens.reshape(n, rows, cols, hidden)
        newline = self.image_newline.view(1, 1, 1, hidden).expand(n, rows, 1, hidden)
        return torch.cat([tokens, newline], dim=2)
