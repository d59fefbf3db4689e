"""A linear layer whose full weight is on every tensor-parallel rank, with Megatron's linear interface: MLA's
down projections on the local backend (TE's spec uses a "duplicated" TELinear there; see models/mla.py)."""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from nemo_pixellm.models.parallel_linear import linear_product


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
        if self.skip_bias_add or self.bias is None:
            return linear_product(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None

    def get_extra_state(self) -> None:
        return None  # TE's Linear keeps FP8 metadata here: an empty entry keeps checkpoints loadable on TE

    def set_extra_state(self, state) -> None:
        pass

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)
