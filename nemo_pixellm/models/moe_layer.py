"""Megatron's MoE layer, with a path for the local backend's inference that skips the token dispatcher.

Without autograd, on one expert-parallel and tensor-parallel rank, the routed tokens need no all-to-all and no
permutation: each expert that got tokens reads them by index and adds its output back at the same rows
(``GroupedLocalExperts.by_routing_map``). The router is Megatron's own call (same experts, weights and bias), and
the sum is Megatron's: routed output + shared expert output. The dispatcher's permute, chunk sort and unpermute
are ~40% of the layer's time when decoding one token per row on a CPU (issue 22's profile).
"""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import get_pg_size

from nemo_pixellm.models.grouped_experts import GroupedLocalExperts


class PixelMoELayer(MoELayer):
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if torch.is_grad_enabled() or intermediate_tensors is not None or not self._dispatch_free():
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        shared = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states, padding_mask)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        output = self.experts.by_routing_map(tokens, probs, routing_map).view_as(hidden_states)
        return (output if shared is None else output + shared), None

    def _dispatch_free(self) -> bool:
        return (isinstance(self.experts, GroupedLocalExperts) and get_pg_size(self.ep_group) == 1
                and get_pg_size(self.tp_group) == 1 and not self.config.moe_latent_size
                and self.experts.loop_applies())
