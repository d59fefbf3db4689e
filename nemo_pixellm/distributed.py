"""One-process torch.distributed and Megatron parallel state, for tools that build a model outside a
training launch (info, evaluate, in-process tests)."""

import os
import tempfile

import torch.distributed as dist


def single_process_groups():
    """Initialise gloo with world size 1 and Megatron's parallel state (once); return the process groups."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    return ProcessGroupCollection.use_mpu_process_groups()


def single_process_model(seed: int = 7, **provider_kwargs):
    """A PixelLMModel from PixelLMProvider(**provider_kwargs) in this one process (CPU, unfused kernels)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from nemo_pixellm.compat import seed_model_parallel_rng, set_process_groups
    from nemo_pixellm.models.provider import PixelLMProvider

    pg_collection = single_process_groups()
    seed_model_parallel_rng(seed, pg_collection)
    provider = PixelLMProvider(**provider_kwargs)
    provider.disable_cuda_fusions()
    set_process_groups(provider, pg_collection)
    provider.finalize()
    clear_aux_losses_tracker()
    return provider.provide()
