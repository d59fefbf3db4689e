"""Shared helpers: run the real entry point in subprocesses (1 or 2 gloo processes) and read its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_pixellm import compat

compat.enable(quiet=True)  # the tests build models in-process, as a library user does

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data/tokenizer cache per test session, so the synthetic set is built once."""
    return tmp_path_factory.mktemp("pixellm-cache")


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PYTHON, "-m", "nemo_pixellm.train", *overrides]
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    return [torchrun, f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
            "-m", "nemo_pixellm.train", *overrides]


def run_train(overrides: list[str], cache_dir: Path, nproc: int = 1, timeout: int = 600, check: bool = True):
    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir), OMP_NUM_THREADS="1" if nproc > 1 else "2")
    proc = subprocess.run(train_command(overrides, nproc), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl: step, loss, lr, time, samples (keys trained on)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir)}


def compose_cfg(overrides: list[str]):
    """conf/ composed with ``overrides`` as ``python -m nemo_pixellm.train`` would (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


QUICK = ["logger.log_interval=1", "validation.eval_interval=null", "dataset.num_workers=0"]


@pytest.fixture(scope="session")
def trained_checkpoint(cache_dir, tmp_path_factory) -> Path:
    """A 30-step stage-3 checkpoint.save directory of the tiny variant with tiling on (112-pixel views, up to 4
    tiles), shared by the tests that use a trained checkpoint (export, generation, stage 4: at 30 steps its
    answers end within a few tokens, which gives GRPO's format reward variance). Read it, do not write it."""
    root = tmp_path_factory.mktemp("trained")
    run_train(["+stage=stage3", *QUICK, "train.train_iters=30", "dataset.image_size=112", "dataset.max_tiles=4",
               f"checkpoint.save={root / 'checkpoints'}", f"run_dir={root / 'run'}"], cache_dir)
    return root / "checkpoints"


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, 1 process) and Megatron's parallel state, for in-process model tests."""
    from nemo_pixellm.distributed import single_process_groups

    return single_process_groups()


# The tiny language model of the in-process tests: DeepSeek-V3's structure (dense first layer, MoE with a
# shared expert, MLA with q / kv low rank, M-RoPE on the rope slice) at toy sizes.
TINY_LM = dict(
    num_layers=2, moe_layer_freq=[0, 1], hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=16, v_head_dim=16,
    num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64,
    mrope_section=[2, 3, 3],
)
# A tower for 56-pixel views (4x4 patches of 14 -> 2x2 tokens after the pixel-unshuffle).
TINY_VISION_56 = dict(vision_hidden_size=32, vision_num_layers=2, vision_num_attention_heads=2,
                      vision_ffn_hidden_size=64, vision_image_size=56)


def build_pixellm(pg_collection, seed: int = 7, **provider_kwargs):
    """A PixelLMModel from PixelLMProvider on CPU with the given sizes (eval mode); ``pg_collection`` (the
    megatron_single_process fixture) only asks that the one-process groups exist, which the builder reuses."""
    from nemo_pixellm.distributed import single_process_model

    return single_process_model(seed, **provider_kwargs).eval()


def write_damaged_shards(out: Path, size: int = 56) -> dict[str, list[int]]:
    """60 synthetic caption records in 6 shards of 10, damaged on purpose; returns the damaged sample indices by
    kind. Planning skips all but ``pixels`` (header and end marker intact), which fails when its pixels decode."""
    import tarfile

    from nemo_pixellm.data.shards import write_shards
    from nemo_pixellm.data.synthetic import scene_record

    records = [scene_record(5, i, size) for i in range(60)]
    records[3]["json"] = b'{"caption": "unterminated'
    records[5]["jpg"] = b"not an image" * 20
    del records[7]["jpg"]
    records[12]["jpg"] = records[12]["jpg"][:-20]  # cut inside the pixel data
    jpg = records[45]["jpg"]
    records[45]["jpg"] = jpg[: jpg.find(b"\xff\xda")] + b"\xff\xd9"  # header, then the end marker: no pixels
    write_shards(records, out, shard_size=10)
    shard2 = out / "shard-000002.tar"
    with tarfile.open(shard2) as tar:
        cut = next(m for m in tar if m.name.startswith(records[25]["__key__"])).offset_data + 10
    with open(shard2, "r+b") as f:
        f.truncate(cut)  # a copy cut short inside sample 25
    (out / "shard-000003.tar").write_bytes(b"")  # an empty shard file
    return {"json": [3], "image": [5], "missing": [7], "truncated_image": [12], "truncated_tar": list(range(25, 30)),
            "empty_shard": list(range(30, 40)), "pixels": [45]}
