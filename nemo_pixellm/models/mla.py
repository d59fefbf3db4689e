"""Multi-head Latent Attention (DeepSeek-V3) on Megatron-Core: the local-backend pieces.

Megatron's MLASelfAttention does the attention math (q/kv low-rank paths with their norms, rope on the
decoupled slice, YaRN); its spec slots are filled here for the pure-PyTorch backend:

- The down projections (hidden -> q_lora, hidden -> kv_lora + rope) are *replicated* across tensor-parallel
  ranks, as in TE's spec ("duplicated" TELinear). Megatron's local spec makes them column-parallel, and
  then the gather's backward drops the other ranks' contributions to the shared rope key: wrong grads at
  TP>1. Replicated weights see a sequence shard each under sequence parallelism, so their gradients are
  summed across TP ranks by finalize_model_grads (the ``sequence_parallel`` attribute), and the shared rope
  key's gradient by the sequence-parallel gather's reduce-scatter. Hence TP>1 requires sequence_parallel.
"""

import torch
import torch.nn.functional as F
import megatron.core.transformer.multi_latent_attention as mcore_mla
from megatron.core.transformer.module import MegatronModule


class ReplicatedLinear(MegatronModule):
    """y = x W^T (+ b) with the full weight on every tensor-parallel rank; Megatron's linear interface."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, **unused):
        super().__init__(config=config)
        self.skip_bias_add = skip_bias_add
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None
        if config.perform_initialization:
            # One full draw from the default generator, like Megatron's CPU init of a parallel linear,
            # so the weights are the same at every TP size.
            master = torch.empty(output_size, input_size, dtype=torch.float32)
            init_method(master)
            with torch.no_grad():
                self.weight.copy_(master)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel  # partial grads under SP: sum across TP

    def forward(self, x: torch.Tensor):
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)


# MLASelfAttention accepts a replicated down projection only if it is its module-level ``Linear``, which
# Megatron binds only when TE is installed; without TE, bind ours.
if mcore_mla.Linear is None:
    mcore_mla.Linear = ReplicatedLinear


def use_local_mla_modules(attention_submodules) -> None:
    """Fill an MLASelfAttentionSubmodules for the local backend (replicated down projections)."""
    attention_submodules.linear_q_down_proj = mcore_mla.Linear
    attention_submodules.linear_kv_down_proj = mcore_mla.Linear
