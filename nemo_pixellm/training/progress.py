"""Console progress (step, loss, learning rate, tokens/s, time left) every ``logger.log_interval`` steps,
and every step's loss at full precision in ``<run_dir>/metrics.jsonl`` for scripts and tests, with the keys
of the samples the step trained on, from every data-parallel rank (the data order, checked across resumes
and layouts), and the bad records the data skipped for them (also said on the console when there are any)."""

import json
import time
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback

from nemo_pixellm.training.run_state import RunState, finished_step


def _is_last_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _whole_batch(keys: list[str], skipped: list[dict]) -> tuple[list[str], list[dict]]:
    """This rank's sample keys and skipped records joined with those of its data-parallel peers, in rank order."""
    if not torch.distributed.is_initialized():
        return keys, skipped
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return keys, skipped
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, (keys, skipped), group=group)
    return [k for part in gathered for k in part[0]], [r for part in gathered for r in part[1]]


class ProgressCallback(Callback):
    def __init__(self, run_state: RunState, run_dir: str | None = None):
        self.run_state = run_state
        self._t0 = None
        self._step0 = None
        self.metrics_file = Path(run_dir) / "metrics.jsonl" if run_dir else None
        self.skipped_total = 0  # bad records skipped since this run started

    def on_train_start(self, context) -> None:
        self._t0, self._step0 = time.time(), context.state.train_state.step

    def on_train_step_end(self, context) -> None:
        cfg, step = context.state.cfg, finished_step(context)
        keys, skipped = self.run_state.take_step()
        keys, skipped = _whole_batch(keys, skipped)  # every rank takes part in the gather
        self.skipped_total += len(skipped)
        if not _is_last_rank() or not context.loss_dict:
            return
        if skipped:
            reasons = "; ".join(record["reason"] for record in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            print(f"[pixellm] step {step}: skipped {len(skipped)} bad record(s), {self.skipped_total} since start: "
                  f"{reasons}", flush=True)
        loss = float(context.loss_dict.get("lm loss", float("nan")))
        extras = {k: float(v) for k, v in context.loss_dict.items() if k != "lm loss"}  # stage 4's reward, KL, ...
        lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else float("nan")
        if self.metrics_file is not None:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a") as f:
                row = {"step": step, "loss": loss, "lr": lr, "time": time.time(), "samples": keys,
                       "skipped": skipped, **extras}
                f.write(json.dumps(row) + "\n")
        if step % cfg.logger.log_interval and step != cfg.train.train_iters:
            return
        elapsed = time.time() - self._t0
        done = max(step - self._step0, 1)
        tokens_per_s = done * cfg.train.global_batch_size * cfg.dataset.seq_length / max(elapsed, 1e-9)
        left = (cfg.train.train_iters - step) * elapsed / done
        shown = "".join(f" | {k} {v:.4g}" for k, v in extras.items())
        print(
            f"[pixellm] step {step:6d}/{cfg.train.train_iters} | loss {loss:.4f}{shown} | lr {lr:.3e} | "
            f"{tokens_per_s:,.0f} tokens/s | {left / 60:.1f} min left",
            flush=True,
        )
