"""What a cluster operator expects of restarts: SIGKILLs at random steps and inside checkpoint saves resume the
exact trajectory (losses, sample keys, skipped bad records), a finished run launched again trains nothing and
exits 0, a full disk fails the save loudly and keeps the previous checkpoint, a half-written checkpoint
directory is made consistent before a resume."""

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import QUICK, ROOT, metrics, run_train, train_command, write_damaged_shards
from nemo_pixellm.training.checkpoints import TRACKER, TRAIN_STATE, newest_complete, recover, tracked_step


def _fake_checkpoint(save_dir: Path, step: int, complete: bool = True, ema: bool = False) -> None:
    it = save_dir / f"iter_{step:07d}"
    it.mkdir(parents=True)
    (it / "__0_0.distcp").write_bytes(b"x" * 100)
    if complete:
        (it / ".metadata").write_bytes(b"m")
        torch.save({"step": torch.tensor(step)}, it / "train_state.pt")
    if ema:
        (it / "ema").mkdir()
        (it / "ema" / "metadata.json").write_text("{}")


def test_recover_points_the_trackers_at_the_newest_complete_checkpoint(tmp_path):
    save = tmp_path / "ck"
    _fake_checkpoint(save, 2, ema=True)
    _fake_checkpoint(save, 4)  # complete, but without the EMA an EMA run needs
    _fake_checkpoint(save, 6, complete=False)  # killed inside the save
    (save / TRACKER).write_text("")  # killed while Bridge rewrote the tracker
    (save / TRAIN_STATE).write_bytes(b"truncated")
    assert newest_complete(save) == 4 and newest_complete(save, ema=True) == 2
    said = recover(save, ema=True)
    print(said)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", TRACKER, TRAIN_STATE]
    assert tracked_step(save) == 2 and int(torch.load(save / TRAIN_STATE, weights_only=True)["step"]) == 2
    assert recover(save, ema=True) == []  # consistent now: nothing to do
    for step in (2,):
        shutil.rmtree(save / f"iter_{step:07d}")
    assert recover(save) == [f"removed {TRACKER} (no complete checkpoint: the run starts fresh)",
                             f"removed {TRAIN_STATE} (no complete checkpoint: the run starts fresh)"]


def _env(cache_dir):
    return dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir), OMP_NUM_THREADS="2")


def _run_until_killed(overrides, cache_dir, log: Path, should_kill) -> bool:
    """Run training, SIGKILL its process group as soon as ``should_kill()``; True if it was killed."""
    with log.open("w") as out:
        proc = subprocess.Popen(train_command(overrides), cwd=ROOT, env=_env(cache_dir), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if should_kill():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return False


@pytest.mark.slow
def test_sigkills_at_random_steps_and_inside_saves_resume_exactly(cache_dir, tmp_path):
    """Five SIGKILLs (three inside a checkpoint save) on damaged data: every step of every leg trains on the
    uninterrupted run's samples with its loss and skips its bad records; a finished run launched again exits 0."""
    damaged = write_damaged_shards(tmp_path / "data")
    iters, ckpt = 24, tmp_path / "ckpt"
    common = ["+stage=stage2", *QUICK, f"train.train_iters={iters}", f"dataset.path={tmp_path / 'data'}",
              "dataset.text_ratio=0", "dataset.max_bad_fraction=0.5", "checkpoint.save_interval=3",
              "checkpoint.most_recent_k=2"]
    run_train([*common, f"run_dir={tmp_path / 'straight'}"], cache_dir)
    straight = {row["step"]: row for row in metrics(tmp_path / "straight")}
    assert sorted(straight) == list(range(1, iters + 1))

    rng = random.Random(19)
    kills, legs = ["save", "step", "save", "step", "save"], []
    for number, kind in enumerate(kills + ["none"]):
        run_dir = tmp_path / f"leg{number}"
        start = newest_complete(ckpt) or 0
        target = start + rng.randint(4, 5)  # each leg saves once (every 3 steps) before it is killed

        def inside_save():  # after one save of this leg, a checkpoint directory that is not complete yet
            steps = [int(p.name[5:]) for p in ckpt.glob("iter_*")] if ckpt.is_dir() else []
            return bool(steps) and max(steps) > (newest_complete(ckpt) or 0) and max(steps) > start + 3

        def after_target():
            rows = (run_dir / "metrics.jsonl").read_text().count("\n") if (run_dir / "metrics.jsonl").exists() else 0
            return start + rows >= target

        should_kill = {"save": inside_save, "step": after_target, "none": lambda: False}[kind]
        killed = _run_until_killed([*common, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                                    f"run_dir={run_dir}"], cache_dir, tmp_path / f"leg{number}.log", should_kill)
        assert killed == (kind != "none"), f"leg {number} ({kind}) ended before it could be killed"
        steps_in_dir = sorted(int(p.name[5:]) for p in ckpt.glob("iter_*"))
        half_written = bool(steps_in_dir) and steps_in_dir[-1] != newest_complete(ckpt)
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        legs.append({"kind": kind, "resumed_from": start, "steps": [r["step"] for r in rows],
                     "half_written": half_written, "log": (tmp_path / f"leg{number}.log").read_text()})
        for row in rows:
            reference = straight[row["step"]]
            assert row["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), (number, row["step"])
            assert row["samples"] == reference["samples"] and row["skipped"] == reference["skipped"]
        assert not rows or rows[0]["step"] == start + 1

    for number, leg in enumerate(legs):
        print(f"leg {number}: {leg['kind']:5s} resumed from step {leg['resumed_from']:2d}, trained "
              f"{leg['steps'][:1] + leg['steps'][-1:]}, left a half-written checkpoint: {leg['half_written']}")
    assert sum(leg["half_written"] for leg in legs if leg["kind"] == "save") >= 2  # kills really inside saves
    for before, after in zip(legs, legs[1:]):
        assert ("removed the incomplete checkpoint" in after["log"]) == before["half_written"]
    covered = {step for leg in legs for step in leg["steps"]}
    assert covered == set(range(1, iters + 1)) and legs[-1]["steps"][-1] == iters
    assert all(later["resumed_from"] > earlier["resumed_from"] for earlier, later in zip(legs, legs[1:]))
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000021", "iter_0000024"]  # most_recent_k=2

    skipped = [r for row in straight.values() for r in row["skipped"]]
    corrupted = sum(len(ids) for ids in damaged.values())
    print(f"{corrupted} records damaged of 60; the uninterrupted run skipped and counted {len(skipped)} bad records "
          f"over {iters} steps ({len({r['index'] % 60 for r in skipped})} distinct)")
    assert {r["index"] % 60 for r in skipped} == {i for ids in damaged.values() for i in ids}

    again = run_train([*common, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", f"run_dir={tmp_path / 'again'}"],
                      cache_dir)
    assert f"[pixellm] nothing to train: checkpoint.load={ckpt} is at step {iters}" in again.stdout
    assert not (tmp_path / "again" / "metrics.jsonl").exists()


def _namespace_prefix() -> list[str] | None:
    """A private mount namespace (to mount a small tmpfs) as this user: unshare -Urm, or -m as root."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-Urm"], ["unshare", "-m"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(cache_dir, tmp_path):
    """An 8 MiB file system holds one checkpoint of the tiny model (5 MiB), not two: the second save fails with a
    message that says the disk is full and which checkpoint is intact; that checkpoint resumes exactly."""
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("needs unshare (util-linux) and user or root mount namespaces to mount a small tmpfs")
    disk, ckpt = tmp_path / "disk", tmp_path / "disk" / "ckpt"
    disk.mkdir()
    common = ["+stage=stage2", *QUICK, "train.train_iters=4", "checkpoint.save_interval=2"]
    first = [*train_command([*common, f"checkpoint.save={ckpt}", f"run_dir={tmp_path / 'full'}"])]
    resume = [*train_command([*common, f"checkpoint.load={ckpt}", f"checkpoint.save={tmp_path / 'elsewhere'}",
                              f"run_dir={tmp_path / 'resumed'}"])]
    script = (f"mount -t tmpfs -o size=8m tmpfs {disk} && {{ {' '.join(first)}; echo \"first rc=$?\"; "
              f"ls {ckpt}; {' '.join(resume)}; echo \"resume rc=$?\"; }}")
    proc = subprocess.run([*prefix, "bash", "-c", script], cwd=ROOT, env=_env(cache_dir), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    error = next((line for line in out.splitlines() if line.startswith("error: checkpoint save")), out[-3000:])
    print(error)
    assert "first rc=1" in out and "resume rc=0" in out, out[-4000:]
    assert "checkpoint save at step 4 failed: the file system of checkpoint.save=" in error and "is full" in error
    assert "the previous checkpoint (step 2) is intact" in error
    assert f"checkpoint.load={ckpt}: removed the incomplete checkpoint iter_0000004" in out
    full, resumed = ({r["step"]: r["loss"] for r in metrics(tmp_path / d)} for d in ("full", "resumed"))
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7) for s in (3, 4))


def test_nothing_a_user_hands_in_is_unpickled(tmp_path):
    """Every torch.load in the plugin passes weights_only=True, and the pinned torch defaults to it, so Megatron's
    own torch.load of a checkpoint's common.pt (no weights_only argument) cannot run code from a checkpoint."""
    calls = [f"{path}:{number}" for folder in ("nemo_pixellm", "data_prep", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if "torch.load(" in line and "weights_only=True" not in line]
    assert calls == []

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    torch.save({"x": Payload()}, tmp_path / "common.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "common.pt")
