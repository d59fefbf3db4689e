"""The forward step Megatron-Bridge's training loop calls for every micro-batch."""

from functools import partial

import torch
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.state import GlobalState
from megatron.core.utils import get_model_config


def next_batch(data_iterator, device: torch.device) -> dict:
    batch = next(data_iterator)
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


_last_view_size = None
seen_sample_keys: list[str] = []  # this rank's training samples since the last step end (ProgressCallback logs them)
seen_skipped: list[dict] = []  # the bad records the data skipped for those samples


def log_resolution_change(step: int, images) -> None:
    """Progressive resolution: say when the training views change size (the data decides, by step)."""
    global _last_view_size
    if images is None or images.shape[0] == 0:
        return
    height, width = images.shape[-2:]
    if (height, width) != _last_view_size:
        was = f" (was {_last_view_size[1]}x{_last_view_size[0]})" if _last_view_size else ""
        print(f"[pixellm] step {step + 1}: image views {width}x{height}{was}", flush=True)
        _last_view_size = (height, width)


def forward_step(state: GlobalState, data_iterator, model, return_schedule_plan: bool = False):
    """Tokens + images -> per-token losses; the loss function averages them over ``loss_mask``."""
    timers = state.timers
    timers("batch-generator", log_level=2).start()
    device = next(model.parameters()).device
    batch = next_batch(data_iterator, device) if data_iterator is not None else None
    timers("batch-generator").stop()
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        images=batch.get("images"),
        image_grids=batch.get("image_grids"),
    )
    if model.training:
        log_resolution_change(state.train_state.step, batch.get("images"))
        seen_sample_keys.extend(key for sequence in batch.get("samples", []) for _, key, _ in sequence)
        seen_skipped.extend(batch.get("skipped", []))
    rerun = state.cfg.rerun_state_machine
    loss_fn = partial(
        masked_next_token_loss, batch["loss_mask"],
        check_for_nan_in_loss=rerun.check_for_nan_in_loss, check_for_spiky_loss=rerun.check_for_spiky_loss,
    )
    return output, loss_fn
