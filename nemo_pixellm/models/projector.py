"""DeepSeek-VL2 projector: 2x2 pixel-unshuffle, then Linear-GELU-Linear to the LM width; then each image's
views are laid out as in ``nemo_pixellm.tiling``: global view, learned view separator, local mosaic, with a
learned newline embedding closing every token row."""

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
    """Vision features [views, gh, gw, c_vision] -> LM tokens of every image, in sequence order."""

    def __init__(self, config, vision_width: int, downsample: int = 2, pg_collection=None):
        super().__init__(config=config)
        self.downsample = downsample
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
        return tokens.reshape(n, rows, cols, -1)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        rows, _, hidden = grid.shape
        newline = self.image_newline.to(grid.dtype).view(1, 1, hidden).expand(rows, 1, hidden)
        return torch.cat([grid, newline], dim=1).reshape(-1, hidden)

    def forward(self, vision_features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """``grids``: [images, 2] (cols, rows) of local tiles per image ((0, 0): global view only); the
        views arrive per image as global, then local tiles row by row. Returns [tokens, hidden]."""
        views = self.project(vision_features)
        side, hidden = views.shape[1], views.shape[-1]
        out, v = [], 0
        for cols, rows in grids.tolist():
            out.append(self._with_newlines(views[v]))
            if cols * rows:
                tiles = views[v + 1: v + 1 + cols * rows].reshape(rows, cols, side, side, hidden)
                mosaic = tiles.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)
                out += [self.view_separator.to(views.dtype).view(1, hidden), self._with_newlines(mosaic)]
            v += 1 + cols * rows
        if v != views.shape[0]:
            raise ValueError(f"the image grids account for {v} views but {views.shape[0]} were given")
        return torch.cat(out)
