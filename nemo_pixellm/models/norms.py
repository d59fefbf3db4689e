"""Torch LayerNorm / RMSNorm for the local backend that also work with sequence parallelism.

Megatron's WrappedTorchNorm refuses sequence_parallel, yet MoE with TP>1 requires it. Under sequence
parallelism each TP rank normalises its own sequence slice, so the norm weights' gradients are partial
sums: marking them ``sequence_parallel`` makes finalize_model_grads all-reduce them across TP.
"""

import torch


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight with its backward written out: under autograd torch's CPU RMSNorm
    is a chain of elementwise ops (pow, mean, add, rsqrt, two products), each with its own backward node."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        width = normed.shape[-1]
        grad_weight = (grad * normed).reshape(-1, width).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)) per row.
            mean_dot = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1).div_(-width)
            grad_x = torch.addcmul(grad_normed, normed, mean_dot).mul_(rstd)
        return grad_x, grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameters and keys) computed by one autograd function in fp32 / fp64 training:
    a tiny training step's nine norms take about half the time of torch's op chain, forward and backward.
    Without autograd (decoding) torch's own has less call overhead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or x.dtype not in (torch.float32, torch.float64) or not torch.is_grad_enabled():
            return super().forward(x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return _RMSNormFunction.apply(x, self.weight, eps)


class TorchNorm:
    """Builds torch.nn.LayerNorm or RMSNorm per ``config.normalization`` (spec-compatible signature)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
