"""Megatron's top-k router, with two changes:

- Switch Transformer's input jitter (``model.moe_input_jitter_eps``: router input x Uniform(1 - eps, 1 + eps))
  applies while training only: Megatron-Core 0.19.2's ``TopKRouter`` jitters in evaluation and decoding too,
  which would make answers and log-probs random.
- ``inference_routes``: without autograd, the chosen experts and their weights as [tokens, k] tensors, Megatron's
  arithmetic without its per-call extras (aux-loss and bias bookkeeping, dense [tokens, experts] maps); the
  dispatcher-free MoE inference (``moe_layer.py``) reads them. ~100 us of Python per call saved, most of the
  router's time when decoding one token per row on a CPU.
"""

import torch
from megatron.core.transformer.moe.router import TopKRouter

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class PixelTopKRouter(TopKRouter):
    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        return super().apply_input_jitter(input) if self.training else input

    def inference_routes_apply(self) -> bool:
        """Plain top-k with a softmax or sigmoid score (DeepSeek-V3's, Mixtral's, Switch's routers): nothing
        Megatron does between the logits and the top-k here changes the chosen experts or their weights."""
        c = self.config
        return (not torch.is_grad_enabled() and c.moe_router_score_function in ("softmax", "sigmoid")
                and not c.moe_router_group_topk and c.moe_expert_capacity_factor is None
                and not c.moe_router_fusion and not c.moe_router_force_load_balancing
                and c.moe_router_force_biased is None and self.router_replay is None
                and self.routing_type not in ("sinkhorn", "quantile_balancing")
                and self.weight.device.type == "cpu")  # on GPUs Megatron's gating may take TE's GEMM: its numbers

    def inference_routes(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [..., h] -> (experts [t, k], weights [t, k]); the numbers of Megatron's ``forward`` (its
        gating product, score function and top-k, unsorted as it is without autograd)."""
        c = self.config
        x = hidden.reshape(-1, hidden.shape[-1])
        dtype = _DTYPES.get(c.moe_router_dtype, x.dtype)
        weight = self.weight.to(dtype)
        logits = (torch.mm(x.to(dtype), weight.t()) if self.bias is None
                  else torch.addmm(self.bias.to(dtype), x.to(dtype), weight.t()))
        if c.moe_router_score_function == "softmax":
            if c.moe_router_pre_softmax:
                weights, experts = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(self.topk, dim=1, sorted=False)
            else:
                scores, experts = logits.topk(self.topk, dim=1, sorted=False)
                weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
            if self.expert_bias is not None:
                experts = (scores + self.expert_bias.float()).topk(self.topk, dim=1, sorted=False)[1]
                scores = scores.gather(1, experts)
            else:
                scores, experts = scores.topk(self.topk, dim=1, sorted=False)
            weights = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else scores
        if c.moe_router_topk_scaling_factor:
            weights = weights * c.moe_router_topk_scaling_factor
        return experts, weights.type_as(logits)
