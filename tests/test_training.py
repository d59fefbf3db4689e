"""End-to-end training through Megatron-Bridge on CPU: the main job learns, resume continues the exact
trajectory, 2-process layouts equal 1 process, and stages freeze what they say and hand off weights."""

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import QUICK, losses, run_train

pytestmark = pytest.mark.slow


def checkpoint_tensors(save_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """All model tensors of the latest torch_dist checkpoint in save_dir (read without Megatron)."""
    iteration = int((save_dir / "latest_checkpointed_iteration.txt").read_text())
    out = tmp_path / f"{save_dir.name}-{iteration}.pt"
    dcp_to_torch_save(save_dir / f"iter_{iteration:07d}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def test_main_job_loss_falls(cache_dir, tmp_path):
    run_train(["+stage=stage2", "train.train_iters=40", f"run_dir={tmp_path}", *QUICK], cache_dir)
    curve = losses(tmp_path)
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (38, 39, 40)) / 3
    print(f"loss steps 1-3 {first:.4f} -> steps 38-40 {last:.4f}")
    assert last < first - 1.0


def test_resume_continues_the_same_trajectory(cache_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    # The commands as a user types them: 10 steps, then 20 with checkpoint.load, vs 20 straight.
    common = ["+stage=stage2", *QUICK, "train.train_iters=20"]
    run_train([*common, f"run_dir={tmp_path / 'straight'}"], cache_dir)
    run_train([*common, "train.train_iters=10", f"checkpoint.save={ckpt}", f"run_dir={tmp_path / 'leg1'}"], cache_dir)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    run_train([*common, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", f"run_dir={tmp_path / 'leg2'}"],
              cache_dir)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "leg2")
    assert sorted(resumed) == list(range(11, 21))  # resumed at step 10
    print("step  uninterrupted  resumed")
    for step in range(11, 21):
        print(f"{step:4d}  {straight[step]:.7f}  {resumed[step]:.7f}")
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
    assert losses(tmp_path / "leg1") == {s: straight[s] for s in range(1, 11)}


def test_stages_freeze_and_hand_off_weights(cache_dir, tmp_path):
    """stage2 -> stage1 (projector only) -> stage1_5 (tower + projector), each from the previous checkpoint."""
    s2, s1, s15 = tmp_path / "s2", tmp_path / "s1", tmp_path / "s15"
    run_train(["+stage=stage2", *QUICK, "train.train_iters=2", f"checkpoint.save={s2}", f"run_dir={tmp_path}/r2"],
              cache_dir)
    run_train(["+stage=stage1", *QUICK, "train.train_iters=3", f"stage.init_from={s2}", f"checkpoint.save={s1}",
               f"run_dir={tmp_path}/r1"], cache_dir)
    run_train(["+stage=stage1_5", *QUICK, "train.train_iters=3", f"stage.init_from={s1}", f"checkpoint.save={s15}",
               f"run_dir={tmp_path}/r15"], cache_dir)
    # Weights only: each stage counts its own steps from 0.
    assert (s1 / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    w2, w1, w15 = (checkpoint_tensors(d, tmp_path) for d in (s2, s1, s15))
    assert set(w2) == set(w1) == set(w15)

    def changed(a, b, prefix):
        names = [k for k in a if k.startswith(prefix)]
        assert names, prefix
        return {k for k in names if not torch.equal(a[k], b[k])}, names

    for stage_from, stage_to, trainable in ((w2, w1, {"projector"}), (w1, w15, {"vision_model", "projector"})):
        for module in ("vision_model", "projector", "language_model"):
            moved, names = changed(stage_from, stage_to, module)
            if module in trainable:
                assert moved, f"{module} should train"
            else:
                assert not moved, f"{module} is frozen but changed: {sorted(moved)[:3]}"
    assert any("image_newline" in k for k in changed(w2, w1, "projector")[0])


def test_progressive_resolution_switches_during_a_run(cache_dir, tmp_path):
    """224 -> 384 -> 512 in one run, with DeepSeek-VL2 tiling (global + separator + 1x1 local: 685 positions
    at 512): the views change size at the scheduled steps, and the log says so."""
    schedule = "[[0.0,224],[0.3,384],[0.6,512]]"
    proc = run_train(["+stage=stage2", *QUICK, "train.train_iters=10", "train.global_batch_size=4",
                      "train.micro_batch_size=2", "seq_length=704", "dataset.max_tiles=1",
                      f"progressive_resolution={schedule}", f"run_dir={tmp_path}"], cache_dir)
    switches = [line for line in proc.stdout.splitlines() if "image views" in line]
    assert switches == ["[pixellm] step 1: image views 224x224",
                        "[pixellm] step 4: image views 384x384 (was 224x224)",
                        "[pixellm] step 7: image views 512x512 (was 384x384)"]
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 11)) and all(0 < v < 20 for v in curve.values())
