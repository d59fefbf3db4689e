"""Shared helpers: run the real entry point in subprocesses (1 or 2 gloo processes) and read its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


QUICK = ["logger.log_interval=1", "validation.eval_interval=null", "dataset.num_workers=0"]


@pytest.fixture(scope="session")
def megatron_single_process(tmp_path_factory):
    """torch.distributed (gloo, 1 process) and Megatron's parallel state, for in-process model tests."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    import nemo_pixellm  # noqa: F401

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("rdzv") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    return ProcessGroupCollection.use_mpu_process_groups()



def build_pixellm(pg_collection, seed: int = 7, **provider_kwargs):
    """A PixelLMModel from PixelLMProvider on CPU with the given sizes (eval mode)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from nemo_pixellm.cpu_compat import seed_model_parallel_rng
    from nemo_pixellm.models.provider import PixelLMProvider

    seed_model_parallel_rng(seed, pg_collection)
    provider = PixelLMProvider(**provider_kwargs)
    provider.disable_cuda_fusions()
    provider._pg_collection = pg_collection
    provider.finalize()
    clear_aux_losses_tracker()
    return provider.provide().eval()
