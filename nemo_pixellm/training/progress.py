"""Console progress (step, loss, learning rate, tokens/s, time left) every ``logger.log_interval`` steps,
and every step's loss at full precision in ``<run_dir>/metrics.jsonl`` for scripts and tests, with the keys
of the samples the step trained on, from every data-parallel rank (the data order, checked across resumes
and layouts)."""

import json
import time
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback

from nemo_pixellm.training import step as step_module


def _is_last_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _whole_batch(keys: list[str]) -> list[str]:
    """This rank's sample keys joined with those of its data-parallel peers, in data-parallel rank order."""
    if not torch.distributed.is_initialized():
        return keys
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return keys
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, keys, group=group)
    return [key for part in gathered for key in part]


class ProgressCallback(Callback):
    def __init__(self, run_dir: str | None = None):
        self._t0 = None
        self._step0 = None
        self.metrics_file = Path(run_dir) / "metrics.jsonl" if run_dir else None

    def on_train_start(self, context) -> None:
        self._t0, self._step0 = time.time(), context.state.train_state.step

    def on_train_step_end(self, context) -> None:
        cfg, step = context.state.cfg, context.state.train_state.step + 1  # the loop counts it after callbacks
        keys = list(step_module.seen_sample_keys)
        step_module.seen_sample_keys.clear()
        if self.metrics_file is not None:  # every rank takes part in the gather
            keys = _whole_batch(keys)
        if not _is_last_rank() or not context.loss_dict:
            return
        loss = float(context.loss_dict.get("lm loss", float("nan")))
        lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else float("nan")
        if self.metrics_file is not None:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a") as f:
                row = {"step": step, "loss": loss, "lr": lr, "time": time.time(), "samples": keys}
                f.write(json.dumps(row) + "\n")
        if step % cfg.logger.log_interval and step != cfg.train.train_iters:
            return
        elapsed = time.time() - self._t0
        done = max(step - self._step0, 1)
        tokens_per_s = done * cfg.train.global_batch_size * cfg.dataset.seq_length / max(elapsed, 1e-9)
        left = (cfg.train.train_iters - step) * elapsed / done
        print(
            f"[pixellm] step {step:6d}/{cfg.train.train_iters} | loss {loss:.4f} | lr {lr:.3e} | "
            f"{tokens_per_s:,.0f} tokens/s | {left / 60:.1f} min left",
            flush=True,
        )
