"""Megatron's top-k router with Switch Transformer's input jitter (``model.moe_input_jitter_eps``: router input x
Uniform(1 - eps, 1 + eps)) applied while training only: Megatron-Core 0.19.2's ``TopKRouter`` jitters in
evaluation and decoding too, which would make answers and log-probs random."""

import torch
from megatron.core.transformer.moe.router import TopKRouter


class PixelTopKRouter(TopKRouter):
    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        return super().apply_input_jitter(input) if self.training else input
