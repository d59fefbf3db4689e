"""A checkpoint directory made consistent before a run resumes from it.

Bridge saves ``iter_N/`` and then, one after the other and none of them atomically, ``iter_N/train_state.pt``,
its copy ``latest_train_state.pt`` and ``latest_checkpointed_iteration.txt`` (what a resume reads). A kill or
a full disk inside a save leaves ``iter_N/`` half written; inside that last window it can leave a tracker
that is empty or names the half-written step. ``recover`` runs on rank 0 before training: it points both
trackers at the newest complete checkpoint (atomically) and removes the incomplete ones newer than it, so a
resume always starts from a checkpoint that was fully written, and the next save of that step starts clean.
"""

import os
import re
import shutil
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
EMA = "ema"  # iter_N/ema/: training/ema.py's distributed checkpoint of the average
TRAIN_STATE = "latest_train_state.pt"
ITERATION = re.compile(r"iter_(\d{7})$")


class CheckpointSaveError(RuntimeError):
    """A checkpoint save that did not complete; the previous checkpoint is intact."""


def iteration_dir(checkpoint) -> Path:
    path = Path(checkpoint)
    latest = path / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        return path / f"iter_{int(latest.read_text()):07d}"
    if path.name.startswith("iter_") and path.is_dir():
        return path
    raise FileNotFoundError(f"{path} is not a checkpoint (no latest_checkpointed_iteration.txt): give a checkpoint.save dir")


def _train_state_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # absent, truncated or foreign: not a usable train state
        return None


def is_complete(iteration_dir: Path, ema: bool = False) -> bool:
    """torch DCP writes ``.metadata`` after every shard; Bridge writes ``train_state.pt`` after the save; the
    EMA's own distributed checkpoint ends with its metadata.json."""
    step = int(ITERATION.search(iteration_dir.name).group(1))
    if not (iteration_dir / ".metadata").is_file() or _train_state_step(iteration_dir / "train_state.pt") != step:
        return False
    return not ema or has_ema(iteration_dir)


def has_ema(iteration_dir) -> bool:
    return (Path(iteration_dir) / EMA / "metadata.json").is_file()  # dist checkpointing's last file, on rank 0


def tracked_step(save_dir: Path) -> int | None:
    try:
        text = (save_dir / TRACKER).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _replace(path: Path, write) -> None:
    aside = path.with_name(path.name + ".tmp")
    write(aside)
    os.replace(aside, path)


def _steps(save_dir: Path) -> list[int]:
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := ITERATION.match(p.name)))


def newest_complete(save_dir, ema: bool = False) -> int | None:
    """The step a resume from ``save_dir`` starts at (read-only: every rank can ask while rank 0 recovers)."""
    save_dir = Path(save_dir)
    complete = [s for s in _steps(save_dir) if is_complete(save_dir / f"iter_{s:07d}", ema)]
    return complete[-1] if complete else None


def recover(save_dir, ema: bool = False) -> list[str]:
    """Make ``save_dir``'s trackers name its newest complete checkpoint; returns what was changed, in words.
    With ``ema``, a checkpoint needs its complete EMA too (a resume must continue the same average)."""
    save_dir = Path(save_dir)
    steps, newest = _steps(save_dir), newest_complete(save_dir, ema)
    said = []
    for step in steps:
        if newest is None or step > newest:  # a save that never finished: nothing in it can be resumed
            shutil.rmtree(save_dir / f"iter_{step:07d}")
            said.append(f"removed the incomplete checkpoint iter_{step:07d}")
    tracked = tracked_step(save_dir)
    if newest is None:
        for name in (TRACKER, TRAIN_STATE):
            if (save_dir / name).exists():
                (save_dir / name).unlink()
                said.append(f"removed {name} (no complete checkpoint: the run starts fresh)")
        return said
    if tracked != newest or _train_state_step(save_dir / TRAIN_STATE) != newest:
        source = save_dir / f"iter_{newest:07d}" / "train_state.pt"
        _replace(save_dir / TRAIN_STATE, lambda aside: shutil.copyfile(source, aside))
        _replace(save_dir / TRACKER, lambda aside: aside.write_text(str(newest)))
        said.append(f"{TRACKER} named {tracked if tracked is not None else 'nothing readable'}: now step {newest}, "
                    "the newest complete checkpoint")
    return said


def failed_save(save_dir) -> str | None:
    """When the run stopped inside a save (a newer checkpoint than the newest complete one is half written):
    what happened and what to do, in words; else None."""
    if not save_dir:
        return None
    save_dir = Path(save_dir)
    steps, newest = _steps(save_dir), newest_complete(save_dir)
    if not steps or steps[-1] == newest:
        return None
    usage = shutil.disk_usage(save_dir)
    full = usage.free < min(64 * 2**20, usage.total // 20)
    why = (f"the file system of checkpoint.save={save_dir} is full ({usage.free / 2**20:.1f} MiB free of "
           f"{usage.total / 2**20:.0f} MiB)" if full else f"writing {save_dir}/iter_{steps[-1]:07d} failed")
    kept = f"the previous checkpoint (step {newest}) is intact" if newest is not None else "no earlier checkpoint exists"
    return (f"checkpoint save at step {steps[-1]} failed: {why}; {kept}. "
            f"{'Free space or point checkpoint.save elsewhere, then ' if full else ''}launch again with "
            f"checkpoint.load={save_dir}: the half-written iter_{steps[-1]:07d} is removed at the start")
