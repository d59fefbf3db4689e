"""Megatron's optimizer with torch's fused CPU AdamW kernel (``training/fused_adam.py``) steps as Megatron's
default, torch's per-tensor AdamW, does on the same model, gradients and parameter groups."""

import torch

from conftest import TINY_LM, TINY_VISION_56, build_pixellm
from nemo_pixellm.training.fused_adam import fuse_cpu_adam, torch_adams

MODEL = dict(seed=3, vocab_size=256, seq_length=32, image_token_id=5, **TINY_LM, **TINY_VISION_56)


def _trained_weights(fused: bool, steps: int = 2) -> tuple[dict[str, torch.Tensor], int]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_pixellm(None, **MODEL)
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=0.0),
        [ddp])
    groups = fuse_cpu_adam(optimizer) if fused else 0
    ids = torch.randint(6, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, -1)
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(ids, positions, attention_mask=None, labels=torch.roll(ids, -1, dims=1)).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
    flags = {g.get("fused") for adam in torch_adams(optimizer) for g in adam.param_groups}
    assert flags == {True if fused else None}
    return {k: v.detach().clone() for k, v in model.named_parameters()}, groups


def test_fused_cpu_adam_steps_as_torchs_per_tensor_adamw(megatron_single_process):
    start = {k: v.detach().clone() for k, v in build_pixellm(None, **MODEL).named_parameters()}
    fused, groups = _trained_weights(fused=True)
    loop, _ = _trained_weights(fused=False)
    assert groups >= 2  # every group of Megatron's optimizer (dense, experts)
    moved = [k for k in fused if not torch.equal(fused[k], start[k])]
    assert len(moved) > 20 and any(".experts." in k for k in moved)
    for k in fused:
        torch.testing.assert_close(fused[k], loop[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
