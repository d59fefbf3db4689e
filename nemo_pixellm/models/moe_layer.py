"""Megatron's MoE layer, with paths for the local backend that skip the token dispatcher.

On one expert-parallel and tensor-parallel rank the routed tokens need no all-to-all: each expert reads its
tokens by index and adds its output back at the same rows (``GroupedLocalExperts.by_pairs``), in the order
and with the sums Megatron's permute / unpermute use. Without autograd the routing is Megatron's own top-k
function on the router's gate (same weights, bias and score function) in its dense form ([tokens, k]
probabilities and expert indices, as Megatron's InferenceTopKRouter asks for it); in training it is the
router's full forward (aux losses, expert-bias counts). The dispatcher's permute, chunk sort and unpermute were
~40% of the layer's time when decoding one token per row on a CPU, the router's sparse [tokens, experts] map and
its search another ~10%; in the tiny training step the dispatcher was ~10% of the layer's forward + backward
(issue 22's profiles)."""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.utils import get_pg_size

from nemo_pixellm.models.grouped_experts import GroupedLocalExperts
from nemo_pixellm.models.router import PixelTopKRouter


class PixelMoELayer(MoELayer):
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None or not self._dispatch_free():
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        shared = self.shared_experts_compute(hidden_states)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if torch.is_grad_enabled():
            # Megatron's router forward (aux losses, expert-bias token counts, jitter); its [tokens, experts] map
            # read expert-major, tokens ascending: the order the dispatcher permutes them in.
            if padding_mask is not None:  # as MoELayer.forward hands it to the router: [s, b]
                padding_mask = padding_mask.transpose(0, 1).bool()
            probs, routing_map = self.route(hidden_states, padding_mask)
            expert_of, token_of = routing_map.t().nonzero(as_tuple=True)
            routed = self.experts.by_pairs(tokens, token_of, expert_of, probs[token_of, expert_of])
        else:  # padding only changes what training's aux losses and expert-bias counts see: not needed here
            routed = self.experts.by_expert_index(tokens, *self._top_k(hidden_states))
        output = routed.view_as(hidden_states)
        return (output if shared is None else output + shared), None

    def _top_k(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice without autograd, as TopKRouter.routing computes it, in dense form."""
        router, c = self.router, self.config
        # TopKRouter.gating's product without its autograd Function (~50 us a call when decoding)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(c.moe_router_dtype, hidden_states.dtype)
        x, weight = hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype), router.weight.to(dtype)
        logits = (torch.mm(x, weight.t()) if router.bias is None
                  else torch.addmm(router.bias.to(dtype), x, weight.t()))
        return topk_routing_with_score_function(
            logits, router.topk, use_pre_softmax=c.moe_router_pre_softmax, num_groups=c.moe_router_num_groups,
            group_topk=c.moe_router_group_topk, scaling_factor=c.moe_router_topk_scaling_factor,
            score_function=router.score_function, expert_bias=router.expert_bias, fused=c.moe_router_fusion,
            router_replay=router.router_replay, dense_output=True)

    def _dispatch_free(self) -> bool:
        """One expert and tensor rank, the grouped local experts, and a router whose eval-mode forward is the gate
        and top-k alone: no input jitter in eval (PixelTopKRouter), no sinkhorn / quantile balancing, no token
        dropping, no forced routing."""
        c, router = self.config, self.router
        plain_router = (isinstance(router, PixelTopKRouter) or c.moe_input_jitter_eps is None) and (
            router.routing_type not in ("sinkhorn", "quantile_balancing") and c.moe_expert_capacity_factor is None
            and not getattr(c, "moe_router_force_load_balancing", False)
            and getattr(c, "moe_router_force_biased", None) is None)
        unsplit = not (self.moe_layer_recompute or self.shared_expert_overlap
                       or c.overlap_dispatch_backward_with_experts_wgrad)  # MoELayer.forward's other paths
        return (plain_router and unsplit and isinstance(self.experts, GroupedLocalExperts)
                and get_pg_size(self.ep_group) == 1
                and get_pg_size(self.tp_group) == 1 and not self.config.moe_latent_size
                and self.experts.loop_applies())
