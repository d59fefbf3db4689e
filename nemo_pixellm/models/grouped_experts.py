"""The routed experts of the local backend as two grouped GEMMs (torch.nn.functional.grouped_mm) instead of a
Python loop of per-expert linears; without autograd (decoding), a loop over only the experts that got tokens.

Megatron-Core groups expert GEMMs only through Transformer Engine (TEGroupedMLP); its local SequentialMLP
runs one MLP per expert, which on a CPU costs a dozen small kernels per expert per layer. This subclass keeps
SequentialMLP's parameters and checkpoint layout (``local_experts.<i>.linear_fc{1,2}.weight``, the same
sharded keys), so checkpoints load either way, and computes the same per-expert math: fc1, GLU, times the
routing probability, fc2. Configurations it does not cover (biases, expert TP > 1, FP8, TE activations,
probabilities on the input, CUDA tensors other than bf16) take SequentialMLP's loop.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from nemo_pixellm.models.parallel_linear import linear_product


# Experts whose weights together hold at most this many elements (4 MB in fp32) decode through the grouped GEMMs
# too: stacking them costs less than the loop's per-expert kernels (tiny model, batch 8: ~7 kernels x 8 experts).
STACKED_DECODE_MAX_ELEMENTS = 1 << 20


class GroupedLocalExperts(SequentialMLP):
    # On CUDA only in bf16 (grouped_mm's CUDA kernels): 6.7x the loop's tokens/s for a 2-layer Pixel slice on an
    # H200 (benchmarks/gpu_check.py). TE's grouped GEMM is the GPU default; this is the local backend's.
    cuda_dtypes = (torch.bfloat16,)

    def loop_applies(self) -> bool:
        """The per-expert math here is SequentialMLP's for this configuration (any device and dtype)."""
        c = self.config
        return (self.num_local_experts > 1 and self.tp_group.size() == 1
                and not (c.add_bias_linear or c.fp8 or c.fp4 or c.use_te_activation_func or c.moe_apply_probs_on_input))

    def _grouped_applies(self, hidden: torch.Tensor) -> bool:
        device = hidden.device.type
        supported = device == "cpu" or (device == "cuda" and hidden.dtype in self.cuda_dtypes)
        return supported and self.loop_applies()

    def _activation(self, intermediate: torch.Tensor, probs: torch.Tensor, dtype) -> torch.Tensor:
        """As megatron.core.transformer.mlp.MLP's unfused path: GLU (or the activation), times the probability."""
        if self.config.gated_linear_unit:
            gate, linear = torch.chunk(intermediate, 2, dim=-1)
            if (clamp := self.config.activation_func_clamp_value) is not None:
                gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
            offset = self.config.glu_linear_offset
            intermediate = self.config.activation_func(gate) * (linear + offset if offset else linear)  # x + 0 is x
        else:
            intermediate = self.config.activation_func(intermediate)
        return (intermediate * probs.unsqueeze(-1)).to(dtype)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if not self._grouped_applies(hidden):
            return super().forward(hidden, tokens_per_expert, probs)
        if not torch.is_grad_enabled() and self._weights_elements() > STACKED_DECODE_MAX_ELEMENTS:
            # decoding / evaluation: only the experts that got tokens, no copies of large weights
            counts = torch.as_tensor(tokens_per_expert).tolist()
            outputs = [self._expert(e, x, p) for e, (x, p) in enumerate(zip(hidden.split(counts), probs.split(counts)))
                       if x.shape[0]]
            return (torch.cat(outputs) if outputs else hidden.new_zeros(0, self.config.hidden_size)), None
        # Training: one grouped GEMM each over the stacked weights (the stack's backward splits the gradients).
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, 2f, h]
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, h, f]
        ends = torch.as_tensor(tokens_per_expert).cumsum(0).to(hidden.device, torch.int32)
        intermediate = _contiguous_grad(F.grouped_mm(hidden, fc1.transpose(1, 2), offs=ends))
        intermediate = self._activation(intermediate, probs, hidden.dtype)
        return _contiguous_grad(F.grouped_mm(intermediate, fc2.transpose(1, 2), offs=ends)), None

    def _weights_elements(self) -> int:
        """All local experts' weight elements: they share one shape, so one expert's times their number."""
        first = self.local_experts[0]
        return self.num_local_experts * (first.linear_fc1.weight.numel() + first.linear_fc2.weight.numel())

    def by_expert_index(self, tokens: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Without a token dispatcher (``PixelMoELayer``'s inference path): tokens [t, h], the router's top-k
        probabilities and expert indices [t, k] -> [t, h]. The (expert, token) pairs in expert order, tokens
        ascending within an expert, as the dispatcher permutes them; each expert's outputs added back at their
        tokens in that order, as its unpermute sums them."""
        order = experts.flatten().argsort(stable=True)  # a token holds an expert once: ties keep token order
        return self.by_pairs(tokens, order // experts.shape[1], experts.flatten()[order], probs.flatten()[order])

    def by_pairs(self, tokens: torch.Tensor, token_of: torch.Tensor, expert_of: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
        """tokens [t, h] -> [t, h]: the routed (token, expert) pairs, in expert order with tokens ascending within
        an expert, and their probabilities; each pair's output added back at its token."""
        counts = torch.bincount(expert_of, minlength=self.num_local_experts)
        outputs, _ = self.forward(tokens.index_select(0, token_of), counts, probs)
        return torch.zeros_like(tokens).index_add_(0, token_of, outputs)

    def _expert(self, e: int, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        expert = self.local_experts[e]
        hidden = self._activation(linear_product(x, expert.linear_fc1.weight), probs, x.dtype)
        return linear_product(hidden, expert.linear_fc2.weight)


def _contiguous_grad(output: torch.Tensor) -> torch.Tensor:
    """grouped_mm's CPU backward refuses strided gradients (a broadcast sum's, an unpermute's)."""
    if output.requires_grad:
        output.register_hook(lambda grad: grad.contiguous())
    return output
