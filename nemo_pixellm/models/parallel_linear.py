"""Megatron's column- and row-parallel linears for the local backend, with a plain path on one tensor-parallel
rank: with no tensor-parallel partner there is nothing to communicate, and Megatron's wrappers (region copies,
its autograd function with a Python backward, group lookups) cost ~30 us of Python a call, most of a CPU
decoding step's time at small sizes and ~10% of the tiny training step (issue 22's profiles). The product is
Megatron's own (``matmul(x, W^T)``, then ``+ bias`` as RowParallelLinear adds it) under torch's autograd:
without autograd the same numbers bit for bit, in training the same gradients to rounding. Fused gradient
accumulation into ``main_grad`` (a GPU feature) keeps Megatron's function.
"""

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


def _plain(linear) -> bool:
    """One rank, none of Megatron's per-call extras (fused wgrad accumulation while training, deferred embedding
    wgrad, CPU offloading, gathered weights)."""
    if torch.is_grad_enabled() and linear.config.gradient_accumulation_fusion:
        return False
    plain = getattr(linear, "_plain_product", None)
    if plain is None:
        c = linear.config
        plain = linear._plain_product = (get_pg_size(linear.tp_group) == 1 and not c.defer_embedding_wgrad_compute
                                           and not c.cpu_offloading
                                           and getattr(linear, "gtp_remat_size", 1) == 1)
    return plain


# Products of at most FEW_ROWS rows (decoding steps, experts' few tokens) times a weight of at least
# FEW_ROWS_MIN_WEIGHT elements (256 KB in fp32: past what stays in a core's caches between decoding steps; smaller
# weights stay there, where BLAS's own choice wins) take ``few_rows_product`` on a CPU without autograd.
FEW_ROWS = 4
FEW_ROWS_MIN_WEIGHT = 1 << 16


def linear_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight^T ([out, in])."""
    if (x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() <= FEW_ROWS * x.shape[-1]
            and weight.numel() >= FEW_ROWS_MIN_WEIGHT):
        return few_rows_product(x, weight)
    return torch.matmul(x, weight.t())


def few_rows_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T computed as (weight @ x^T)^T, one row sent as two. The weight streams from memory, and on the
    2-core EPYC box BLAS reads it at 4-9 GB/s for x @ weight^T with 1-4 rows (one row: a single-threaded
    matrix-vector product) against 13-28 GB/s in this form; at 6-8 rows the two are even. Same sums (~1e-7)."""
    rows = x.reshape(-1, x.shape[-1])
    wide = rows.repeat(2, 1) if rows.shape[0] == 1 else rows
    return torch.mm(weight, wide.t())[:, :rows.shape[0]].t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _product(linear, x: torch.Tensor, weight: torch.Tensor | None = None):
    """Megatron's linear output pair: (x W^T + b, None), or (x W^T, b) with skip_bias_add. ``weight`` replaces
    the layer's own (GPTModel's output layer is given the embedding table when the two are tied)."""
    output = linear_product(x, linear.weight if weight is None else weight)
    if linear.skip_bias_add:
        return output, linear.bias
    return (output + linear.bias if linear.bias is not None else output), None


class LocalColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        return _product(self, input_, weight)


class LocalRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        return _product(self, input_) if _plain(self) else super().forward(input_)
