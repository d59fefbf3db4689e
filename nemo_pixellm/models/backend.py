"""Backend selection: Transformer Engine modules when TE is importable, pure PyTorch otherwise.

Both backends fill the same ModuleSpec slots. TE fuses the norm that precedes a linear into it (its weight
is then ``<linear>.layer_norm_weight``); the Hugging Face name map in ``hf/deepseek_v3.py`` accepts both spellings.
"""

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

from functools import partial

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

from nemo_pixellm.models.core_attention import SDPACoreAttention
from nemo_pixellm.models.grouped_experts import GroupedLocalExperts
from nemo_pixellm.models.norms import TorchNorm
from nemo_pixellm.models.parallel_linear import LocalColumnParallelLinear, LocalRowParallelLinear
from nemo_pixellm.models.replicated_linear import ReplicatedLinear

try:
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


class TorchSpecProvider(LocalSpecProvider):
    """Megatron's local modules, with core attention over torch SDPA (MLA needs k/v channels), norms that
    accept sequence parallelism (MoE with TP needs it), a TP-replicated linear (TE's ``linear()``; Megatron's
    local provider has none), the routed experts as grouped GEMMs, and parallel linears that are a plain product
    on one tensor-parallel rank (``parallel_linear.py``)."""

    def linear(self) -> type:
        return ReplicatedLinear

    def column_parallel_linear(self) -> type:
        return LocalColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return LocalRowParallelLinear

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return partial(GroupedLocalExperts, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=self.activation_func()))

    def core_attention(self) -> type:
        return SDPACoreAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
        return TorchNorm


def resolve_use_te(use_te: bool | None) -> bool:
    """None means: Transformer Engine if it is installed."""
    return HAVE_TE if use_te is None else use_te


def spec_provider(use_te: bool | None = None) -> BackendSpecProvider:
    use_te = resolve_use_te(use_te)
    if use_te and not HAVE_TE:
        raise RuntimeError("transformer_engine is not installed: install the [gpu] extra or set model.use_te=false")
    return TESpecProvider() if use_te else TorchSpecProvider()
