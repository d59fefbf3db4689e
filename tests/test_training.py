"""End-to-end training through Megatron-Bridge on CPU: the main job learns, resume continues the exact
trajectory, 2-process layouts equal 1 process, and stages freeze what they say and hand off weights."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import PYTHON, QUICK, ROOT, losses, metrics, run_train
from nemo_pixellm.training.checkpoints import has_ema

pytestmark = pytest.mark.slow


def checkpoint_tensors(save_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """All model tensors of the latest torch_dist checkpoint in save_dir (read without Megatron)."""
    iteration = int((save_dir / "latest_checkpointed_iteration.txt").read_text())
    out = tmp_path / f"{save_dir.name}-{iteration}.pt"
    dcp_to_torch_save(save_dir / f"iter_{iteration:07d}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def ema_tensors(iteration_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The EMA saved with a checkpoint (iter_N/ema/, a torch_dist checkpoint of its own), by checkpoint key."""
    out = tmp_path / f"ema-{iteration_dir.parent.name}-{iteration_dir.name}.pt"
    dcp_to_torch_save(iteration_dir / "ema", out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


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
    # The data order: the interrupted run saw exactly the uninterrupted run's samples, none repeated or skipped.
    keys = lambda run: [k for row in metrics(tmp_path / run) for k in row["samples"]]  # noqa: E731
    assert keys("leg1") + keys("leg2") == keys("straight")
    assert len(keys("straight")) >= 20 * 8 and any(k.startswith("text_") for k in keys("straight"))


def changed(a: dict, b: dict, prefix: str) -> set[str]:
    names = [k for k in a if k.startswith(prefix)]
    assert names, prefix
    return {k for k in names if not torch.equal(a[k], b[k])}


def assert_hand_offs(weights: dict, hand_offs) -> None:
    """(before, after, trainable modules): between the two stages' checkpoints exactly those modules moved."""
    for before, after, trainable in hand_offs:
        for module in ("vision_model", "projector", "language_model"):
            moved = changed(weights[before], weights[after], module)
            if module in trainable:
                assert moved, f"{after}: {module} should train"
            else:
                assert not moved, f"{after}: {module} is frozen but changed: {sorted(moved)[:3]}"


def test_pipeline_chains_stages_freezing_what_they_say(cache_dir, tmp_path):
    """`python -m nemo_pixellm.pipeline`: each stage starts from the previous checkpoint (weights only) and moves
    only its trainable modules: stage1 the projector (with newline / separator), stage1_5 tower + projector."""
    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir), OMP_NUM_THREADS="2")
    stages = ["stage2", "stage1", "stage1_5", "stage3"]
    proc = subprocess.run([PYTHON, "-m", "nemo_pixellm.pipeline", f"stages=[{','.join(stages)}]", "steps=[2,3,3,2]",
                           f"root={tmp_path}", "eval_samples=2", "ema.enabled=true", *QUICK],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert [(r["stage"], r["steps"]) for r in rows] == list(zip(stages, [2, 3, 3, 2]))
    assert all(0.0 <= r["heldout_accuracy"] <= 1.0 and r["final_loss"] > 0 for r in rows)
    ckpt = {s: tmp_path / s / "checkpoints" for s in stages}
    assert (ckpt["stage1"] / "latest_checkpointed_iteration.txt").read_text().strip() == "3"  # own steps from 0
    w = {s: checkpoint_tensors(ckpt[s], tmp_path) for s in stages}
    assert len({frozenset(v) for v in w.values()}) == 1
    assert_hand_offs(w, (("stage2", "stage1", {"projector"}), ("stage1", "stage1_5", {"vision_model", "projector"}),
                         ("stage1_5", "stage3", {"vision_model", "projector", "language_model"})))
    assert any("image_newline" in k for k in changed(w["stage2"], w["stage1"], "projector"))
    assert all(has_ema(ckpt[s] / f"iter_{r['steps']:07d}") for s, r in zip(stages, rows))


@pytest.mark.slow
def test_every_stage_runs_on_the_llama4_variant(cache_dir, tmp_path):
    """variant=llama4_cpu (GQA, iRoPE with chunked attention, packed samples, MoE) through the pipeline's stages
    1 -> 1.5 -> 3 -> 4 (GRPO): each stage moves what it trains, stage 4 keeps the MoE routers frozen, and the
    rollouts' log-probs (cached GQA decoding over chunks) equal the training forward's within 1e-5."""
    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir), OMP_NUM_THREADS="2")
    stages = ["stage1", "stage1_5", "stage3", "stage4"]
    proc = subprocess.run([PYTHON, "-m", "nemo_pixellm.pipeline", f"stages=[{','.join(stages)}]", "steps=[2,2,2,2]",
                           f"root={tmp_path}", "eval_samples=0", "variant=llama4_cpu", "dataset.pack=true", *QUICK],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w = {s: checkpoint_tensors(tmp_path / s / "checkpoints", tmp_path) for s in stages}
    assert_hand_offs(w, (("stage1", "stage1_5", {"vision_model", "projector"}),
                         ("stage1_5", "stage3", {"vision_model", "projector", "language_model"}),
                         ("stage3", "stage4", {"vision_model", "projector", "language_model"})))
    routers = [k for k in w["stage4"] if k.endswith("mlp.router.weight")]
    assert routers and all(torch.equal(w["stage3"][k], w["stage4"][k]) for k in routers)
    rows = metrics(tmp_path / "stage4" / "run")
    print("llama4_cpu stage 4:", [{k: r[k] for k in ("step", "loss", "reward", "logprob_gap")} for r in rows])
    assert len(rows) == 2 and all(r["logprob_gap"] <= 1e-5 for r in rows)


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


def test_ema_follows_its_formula_and_survives_resume(cache_dir, tmp_path):
    """ema_t = d * ema_(t-1) + (1 - d) * w_t on the saved weights, and a resumed run writes the same EMA."""
    ema = ["ema.enabled=true", "ema.decay=0.5", "checkpoint.save_interval=1", "train.train_iters=3"]
    proc = run_train(["+stage=stage2", *QUICK, *ema, f"checkpoint.save={tmp_path / 'a'}", f"run_dir={tmp_path / 'ra'}",
                      "vqa_eval.interval=3", "vqa_eval.samples=2"], cache_dir)
    # Periodic held-out VQA (on the EMA weights): on the console and in TensorBoard.
    assert sum("held-out VQA accuracy" in line for line in proc.stdout.splitlines()) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ra" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("vqa/all")] == [3]
    # ... and in run_dir/vqa.jsonl, the curve benchmarks/stage_chain.py plots: the same figures.
    (curve,) = [json.loads(line) for line in (tmp_path / "ra" / "vqa.jsonl").read_text().splitlines()]
    assert curve["step"] == 3 and curve["vqa"]["all"]["accuracy"] == pytest.approx(events.Scalars("vqa/all")[0].value)
    ema_at = {t: ema_tensors(tmp_path / "a" / f"iter_{t:07d}", tmp_path) for t in (1, 2, 3)}
    weights = checkpoint_tensors(tmp_path / "a", tmp_path)  # step 3
    names = [n for n in ema_at[3] if n.startswith("projector.")]
    assert names and set(ema_at[3]) == set(ema_at[1])
    averaged = 0
    for name in names:
        (stored,) = [v for k, v in weights.items() if k.endswith(name)]
        torch.testing.assert_close(ema_at[3][name], 0.5 * ema_at[2][name] + 0.5 * stored, rtol=1e-6, atol=1e-7)
        averaged += not torch.equal(ema_at[3][name], stored)  # weights that moved lag behind in the EMA
    assert averaged >= 2
    # Stop after 2 steps and resume to 3: the EMA state continues exactly.
    run_train(["+stage=stage2", *QUICK, *ema, "train.train_iters=2", f"checkpoint.save={tmp_path / 'b'}",
               f"run_dir={tmp_path / 'rb'}"], cache_dir)
    run_train(["+stage=stage2", *QUICK, *ema, f"checkpoint.load={tmp_path / 'b'}", f"checkpoint.save={tmp_path / 'b'}",
               f"run_dir={tmp_path / 'rb2'}"], cache_dir)
    resumed = ema_tensors(tmp_path / "b" / "iter_0000003", tmp_path)
    for name in ema_at[3]:
        torch.testing.assert_close(resumed[name], ema_at[3][name], rtol=1e-6, atol=1e-7)


def test_vision_lr_mult_scales_the_towers_learning_rate_alone(cache_dir, tmp_path):
    """stage.vision_lr_mult (Bridge's optimizer parameter-group overrides): one plain-SGD step from the same
    weights moves every vision-tower weight by exactly mult x its move at mult 1, and nothing else differently."""
    sgd = ["optimizer.optimizer=sgd", "optimizer.lr=0.5", "optimizer.min_lr=0.5", "scheduler.lr_warmup_iters=0",
           "optimizer.clip_grad=0", "optimizer.weight_decay=0", "train.train_iters=1"]
    run_train(["+stage=stage2", *QUICK, "train.train_iters=1", f"checkpoint.save={tmp_path / 'init'}",
               f"run_dir={tmp_path / 'init-run'}"], cache_dir)
    start = checkpoint_tensors(tmp_path / "init", tmp_path)
    moves = {}
    for mult in (1.0, 0.1):
        save = tmp_path / f"mult{mult}"
        run_train(["+stage=stage2", *QUICK, *sgd, f"stage.vision_lr_mult={mult}", f"stage.init_from={tmp_path / 'init'}",
                   f"checkpoint.save={save}", f"run_dir={tmp_path / f'run{mult}'}"], cache_dir)
        moves[mult] = {k: v - start[k] for k, v in checkpoint_tensors(save, tmp_path).items() if k in start}
    vision = [k for k in moves[1.0] if k.startswith("vision_model.") and moves[1.0][k].abs().max() > 0]
    others = [k for k in moves[1.0] if not k.startswith("vision_model.") and moves[1.0][k].abs().max() > 0]
    assert vision and others
    for k in vision:
        torch.testing.assert_close(moves[0.1][k], 0.1 * moves[1.0][k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    for k in others:
        torch.testing.assert_close(moves[0.1][k], moves[1.0][k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_pipeline_sends_a_stage_prefixed_override_to_that_stage_only(tmp_path):
    """`stage2:stage.vision_lr_mult=0.1` reaches stage 2's command line alone; the others get what has no prefix;
    a stage not in the chain and a key the chain sets per stage are refused by name."""
    from nemo_pixellm.pipeline import split_stage_overrides
    from nemo_pixellm.stages import plan_chain
    from nemo_pixellm.training.validate import ConfigError

    stages = ["stage1", "stage2", "stage3"]
    extra = ["ema.enabled=true", "stage2:stage.vision_lr_mult=0.1", "dataset.path=s3:bucket/x"]
    common, own = split_stage_overrides(stages, extra)
    assert common == ["ema.enabled=true", "dataset.path=s3:bucket/x"]  # a ':' inside a value is no prefix
    plan = plan_chain(stages, tmp_path, common, [own[s] for s in stages])
    assert [("stage.vision_lr_mult=0.1" in run.overrides) for run in plan] == [False, True, False]
    assert all("ema.enabled=true" in run.overrides for run in plan)
    with pytest.raises(SystemExit, match="names stage 'stage4', which is not in this chain"):
        split_stage_overrides(stages, ["stage4:stage.algorithm=dpo"])
    with pytest.raises(ConfigError, match="checkpoint.save is set per stage"):
        plan_chain(stages, tmp_path, [], [[], [f"checkpoint.save={tmp_path}"], []])
