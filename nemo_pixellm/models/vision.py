"""SigLIP-style vision tower: patch embedding, interpolated learned positions, pre-norm ViT, final norm.

The position table is learned at a base grid and resized bicubically to each input's grid, so one tower
serves 224, 384 and 512 inputs (the upstream fixed 576-entry table crashed on progressive resolution).
"""

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from nemo_pixellm.models.specs import vision_layer_spec


class VisionTower(MegatronModule):
    """Images [n, 3, H, W] -> patch features [n, H/patch, W/patch, width]."""

    def __init__(self, config, patch_size: int, base_image_size: int, pg_collection=None):
        super().__init__(config=config)
        self.patch_size = patch_size
        self.base_grid = base_image_size // patch_size
        width = config.hidden_size
        self.patch_embedding = torch.nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = torch.nn.Parameter(torch.empty(self.base_grid * self.base_grid, width))
        # SigLIP's init (std 1/sqrt(width)): at Megatron's 0.02 the positions start invisible beside the patch features
        torch.nn.init.normal_(self.position_embedding, std=width ** -0.5)
        self.encoder = TransformerBlock(
            config, vision_layer_spec(getattr(config, "use_te", None)), post_layer_norm=True, pg_collection=pg_collection
        )

    def positions_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        table = self.position_embedding
        if (grid_h, grid_w) == (self.base_grid, self.base_grid):
            return table
        side = int(math.isqrt(table.shape[0]))
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [n, c, gh, gw]
        n, width, grid_h, grid_w = patches.shape
        hidden = patches.flatten(2).transpose(1, 2) + self.positions_for(grid_h, grid_w)  # [n, gh*gw, c]
        hidden = self.encoder(hidden.transpose(0, 1).contiguous(), attention_mask=None)  # [s, n, c]
        return hidden.transpose(0, 1).reshape(n, grid_h, grid_w, width)
