"""Torch LayerNorm / RMSNorm for the local backend that also work with sequence parallelism.

Megatron's WrappedTorchNorm refuses sequence_parallel, yet MoE with TP>1 requires it. Under sequence
parallelism each TP rank normalises its own sequence slice, so the norm weights' gradients are partial
sums: marking them ``sequence_parallel`` makes finalize_model_grads all-reduce them across TP.
"""

import torch


class TorchNorm:
    """Builds torch.nn.LayerNorm or torch.nn.RMSNorm per ``config.normalization`` (spec-compatible signature)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
