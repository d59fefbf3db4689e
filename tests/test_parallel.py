"""Tensor, pipeline, expert and data parallelism on 2 gloo processes equal one process.

Every run starts from the same checkpoint and takes 3 plain-SGD steps with a large learning rate, so
each step's update is lr x gradient: equal loss trajectories mean equal forward losses and gradients,
and the final weights (expert biases included, updated from loads counted across the layout) are
compared tensor by tensor, and so is the EMA saved beside them (decay 0.5: it differs from the weights).
MLA with TP=2 through Megatron's column-parallel down projections fails this
(step-2 loss off by ~1e-5 relative): the plugin's replicated down projections are what make it pass.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, QUICK, ROOT, compose_cfg, losses, metrics, run_train
from test_training import checkpoint_tensors, ema_tensors

pytestmark = pytest.mark.slow

SGD = ["optimizer.optimizer=sgd", "optimizer.lr=0.5", "optimizer.min_lr=0.5", "scheduler.lr_warmup_iters=0",
       "optimizer.clip_grad=0", "train.train_iters=3", "ema.enabled=true", "ema.decay=0.5"]
LAYOUTS = {
    "tp2": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"],
    "pp2": ["model.pipeline_model_parallel_size=2"],
    "ep2": ["model.expert_model_parallel_size=2"],
    "tp2_ep2": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                "model.expert_model_parallel_size=2"],
    "dp2": [],
}


def sample_keys(run_dir: Path) -> list[list[str]]:
    return [sorted(row["samples"]) for row in metrics(run_dir)]


# Grouped-query attention (tests/test_gqa.py) with 2 key / value heads: TP=2 puts one on each rank.
GQA = ["model.multi_latent_attention=false", "model.num_query_groups=2"]


def one_process_runs(root: Path, cache_dir, architecture: list[str]) -> Path:
    """A 1-step checkpoint to start from, then the 3 SGD steps on one process."""
    run_train(["+stage=stage2", *QUICK, *architecture, "train.train_iters=1", f"checkpoint.save={root / 'init'}",
               f"run_dir={root / 'init-run'}"], cache_dir)
    run_train(["+stage=stage2", *QUICK, *architecture, *SGD, f"stage.init_from={root / 'init'}",
               f"checkpoint.save={root / 'one'}", f"run_dir={root / 'one-run'}"], cache_dir)
    return root


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    return one_process_runs(tmp_path_factory.mktemp("parallel"), cache_dir, [])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_one_process(layout, reference: Path, cache_dir, tmp_path):
    check_two_processes(reference, LAYOUTS[layout], layout, cache_dir, tmp_path)
    if layout == "tp2_ep2":
        check_ema_export(reference, cache_dir, tmp_path)


# Packed samples (THD, Megatron's PackedSeqParams): TP=2 splits the packed tokens under sequence parallelism;
# PP=2 passes them between stages in the schedule's [s, b, h] shape.
PACKED = ["dataset.pack=true", "dataset.image_size=112", "model.vision_image_size=112"]  # 112 px: ~3 samples a row


@pytest.fixture(scope="module")
def packed_reference(cache_dir, tmp_path_factory):
    return one_process_runs(tmp_path_factory.mktemp("packed"), cache_dir, PACKED)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_packed_layout_equals_one_process(layout, packed_reference: Path, cache_dir, tmp_path):
    rows = compose_cfg(["+stage=stage2", *PACKED]).train.global_batch_size
    assert all(len(keys) > rows for keys in sample_keys(packed_reference / "one-run"))  # rows hold several samples
    check_two_processes(packed_reference, [*PACKED, *LAYOUTS[layout]], f"packed {layout}", cache_dir, tmp_path)


# Context parallelism: the loss summed over each rank's tokens (per-rank means would average different counts)
PER_TOKEN = ["+model.calculate_per_token_loss=true"]


def test_cp2_equals_one_process(cache_dir, tmp_path):
    reference = one_process_runs(tmp_path / "reference", cache_dir, PER_TOKEN)
    check_two_processes(reference, [*PER_TOKEN, "model.context_parallel_size=2"], "cp2", cache_dir, tmp_path)


def test_gqa_tp2_equals_one_process(cache_dir, tmp_path):
    reference = one_process_runs(tmp_path / "reference", cache_dir, GQA)
    check_two_processes(reference, [*GQA, *LAYOUTS["tp2"]], "gqa tp2", cache_dir, tmp_path)


def check_ema_export(reference: Path, cache_dir, tmp_path) -> None:
    """The EMA of a 2-process run, exported by one process (the checkpoint resharded to TP = EP = 1), equals
    the export of the 1-process run's EMA tensor for tensor."""
    from safetensors.torch import load_file

    exports = {}
    for name, ckpt in (("one", reference / "one"), ("two", tmp_path / "ckpt")):
        out = tmp_path / f"export-{name}"
        proc = subprocess.run([PYTHON, "-m", "nemo_pixellm.export", f"checkpoint={ckpt}", f"out={out}"], cwd=ROOT,
                              env=dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir)), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and '"ema": true' in proc.stdout, proc.stderr[-3000:]
        exports[name] = {f"{f.relative_to(out)}:{k}": v for f in sorted(out.rglob("*.safetensors"))
                         for k, v in load_file(f).items()}
    assert set(exports["one"]) == set(exports["two"]) and len(exports["one"]) > 50
    for name, tensor in exports["one"].items():
        torch.testing.assert_close(exports["two"][name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def check_two_processes(reference: Path, overrides: list[str], layout: str, cache_dir, tmp_path) -> None:
    run_train(["+stage=stage2", *QUICK, *SGD, *overrides, f"stage.init_from={reference / 'init'}",
               f"checkpoint.save={tmp_path / 'ckpt'}", f"run_dir={tmp_path / 'run'}"], cache_dir, nproc=2)
    one, two = losses(reference / "one-run"), losses(tmp_path / "run")
    print(f"{layout}: 1 process {one} | 2 processes {two}")
    assert one[3] < one[1] - 0.5  # the steps are large (packed rows: 0.88 nats in 2 steps): gradients matter
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-6)
    # Each step trained on the same samples (under DP2 each rank holds half of them).
    assert sample_keys(tmp_path / "run") == sample_keys(reference / "one-run") and sample_keys(tmp_path / "run")[0]
    single, parallel = checkpoint_tensors(reference / "one", tmp_path), checkpoint_tensors(tmp_path / "ckpt", tmp_path)
    assert set(single) == set(parallel)
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    biases = [n for n in single if n.endswith("expert_bias")]
    assert biases and any(single[n].abs().sum() > 0 for n in biases)  # the bias did move, identically
    # The EMA is sharded like the weights: as global tensors, the 2-process run's equals the 1-process run's.
    ema_one, ema_two = (ema_tensors(ckpt / "iter_0000003", tmp_path) for ckpt in (reference / "one", tmp_path / "ckpt"))
    assert set(ema_one) == set(ema_two) and any(not torch.equal(ema_one[k], single[k]) for k in ema_one if k in single)
    for name, tensor in ema_one.items():
        torch.testing.assert_close(ema_two[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"EMA {name}: {m}")
