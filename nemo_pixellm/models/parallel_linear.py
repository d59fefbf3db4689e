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


# Weights (elements) from which one row's product is a multiply and row sum on a CPU (``linear_product``): 256 KB
# in fp32, past what stays in a core's caches between decoding steps; smaller weights stay there, where BLAS wins.
ROW_PRODUCT_MIN_WEIGHT = 1 << 16


def linear_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight^T ([out, in]). One row on a CPU without autograd (a decoding step at batch 1) times a
    weight of at least ROW_PRODUCT_MIN_WEIGHT elements is a multiply and row sum: the weight streams from memory,
    and BLAS's single-row product read it at 9-10 GB/s on the 2-core EPYC box (one thread) against 16-21 GB/s
    for these two ops on both threads. Same products, summed in another order (~1e-7)."""
    if (x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() == x.shape[-1]
            and weight.numel() >= ROW_PRODUCT_MIN_WEIGHT):
        return row_sums(x, weight)
    return torch.matmul(x, weight.t())


def row_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One row x [..., in] (one element in the leading dims) times weight^T as a multiply and row sum."""
    return (weight * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], weight.shape[0])


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
