"""The launcher on a real Slurm (the one-node cluster of scripts/slurm_up.sh, which .ci/run starts): a stage chain
of 2-process gloo jobs, the second preempted mid-run by its warning signal, requeued and resumed.

One Slurm run serves every test here (each job costs about a minute on 2 cores): stage1 -> stage2 (afterok),
SIGUSR1 to stage2's batch shell after its first steps."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, QUICK, ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40


def slurm_problem() -> str | None:
    """Why no job can run here, or None when a node is up."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "Slurm is not installed"
    except subprocess.TimeoutExpired:
        return "Slurm's controller does not answer"
    if out.returncode != 0:
        return f"Slurm is not running ({out.stderr.strip()})"
    if not any(state.startswith(("idle", "mix", "alloc")) for state in out.stdout.split()):
        return f"no Slurm node is up (node states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = slurm_problem()
    if problem:
        message = f"{problem}: start the local cluster with scripts/slurm_up.sh (as root), as .ci/run does"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def job(job_id: str, tries: int = 5) -> dict[str, str]:
    for attempt in range(tries):
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
        if out.returncode == 0:
            return dict(re.findall(r"(\w+)=(\S*)", out.stdout))
        # scontrol can die (SIGPIPE on its controller socket) while slurmctld requeues the job: ask again
        time.sleep(1 + attempt)
    raise AssertionError(f"scontrol show job {job_id} failed {tries} times (rc {out.returncode}): {out.stderr.strip()}")


def wait_for(condition, what: str, timeout: float = 300, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(job_id: str) -> bool:
    return job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.fixture(scope="module")
def chain(slurm, cache_dir, tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("slurm-jobs")
    env = dict(os.environ, NEMO_PIXELLM_CACHE=str(cache_dir))  # sbatch passes the environment on to the jobs
    t0 = time.time()
    submitted = subprocess.run(
        [PYTHON, "-m", "nemo_pixellm.launch", "stages=[stage1,stage2]", "cluster=local_slurm",
         f"cluster.job_dir={job_dir}", f"train.train_iters={STEPS}", "model.tensor_model_parallel_size=1", *QUICK],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    ids = dict(re.findall(r"^(\w+): submitted job (\d+)", submitted.stdout, re.M))
    try:
        dependency = job(ids["stage2"])["Dependency"]  # read at once, before stage1 ends and clears it
        metrics = job_dir / "stage2" / "run" / "metrics.jsonl"
        wait_for(lambda: len(steps(metrics)) >= 3, "stage2's first steps", timeout=400)
        subprocess.run(["scancel", "--batch", "--signal=USR1", ids["stage2"]], check=True)  # what --signal does
        wait_for(lambda: job(ids["stage2"])["Restarts"] == "1", "the requeue", timeout=120)
        # Slurm holds the requeued job until its old credentials expire (cred_expire=15 in scripts/slurm_up.sh;
        # releasing it earlier by hand races with that and fails the job).
        wait_for(lambda: finished(ids["stage2"]), "stage2 to finish", timeout=400, every=2)
        print(f"stage1 -> stage2 with a preemption: {time.time() - t0:.0f} s")
        logs = {stage: (job_dir / "logs" / f"pixellm-{stage}-{n}.out").read_text() for stage, n in ids.items()}
        yield {"dir": job_dir, "ids": ids, "dependency": dependency, "logs": logs, "launch": submitted}
    finally:  # leave no job behind to hold the node's CPUs (a no-op for finished jobs)
        subprocess.run(["scancel", *ids.values()], capture_output=True)


def latest_iteration(checkpoints: Path) -> int:
    return int((checkpoints / "latest_checkpointed_iteration.txt").read_text())


def test_chain_runs_each_stage_from_the_previous_checkpoint(chain):
    ids, job_dir = chain["ids"], chain["dir"]
    print(chain["launch"].stderr.splitlines()[-2:])
    assert chain["dependency"].startswith(f"afterok:{ids['stage1']}")
    for stage in ("stage1", "stage2"):
        info = job(ids[stage])
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), chain["logs"][stage][-3000:]
        assert latest_iteration(job_dir / stage / "checkpoints") == STEPS
    # Two Slurm tasks form one data-parallel group: only its last rank writes metrics, so each step appears once.
    assert re.search(r"\[launch\] job \d+ restart 0 on \S+ \(2 tasks\)", chain["logs"]["stage1"])
    assert steps(job_dir / "stage1" / "run" / "metrics.jsonl") == list(range(1, STEPS + 1))
    # stage2's first run found no checkpoint of its own and took stage1's weights (Bridge's pretrained path).
    stage1_ckpt = job_dir / "stage1" / "checkpoints"
    assert f"stage.init_from={stage1_ckpt}" in (job_dir / "stage2" / "job.sbatch").read_text()
    assert f"Attempting to finetune with checkpoint in {stage1_ckpt}" in chain["logs"]["stage2"]


def test_preempted_job_saves_requeues_and_resumes(chain):
    ids, job_dir, log = chain["ids"], chain["dir"], chain["logs"]["stage2"]
    assert job(ids["stage2"])["Restarts"] == "1"
    assert "[launch] SIGUSR1: checkpointing, then requeueing" in log
    assert re.search(rf"\[launch\] job {ids['stage2']} restart 1 ", log)
    # The signal's checkpoint, mid-run, and the final one.
    checkpoints = job_dir / "stage2" / "checkpoints"
    saved = sorted(int(p.name.removeprefix("iter_")) for p in checkpoints.glob("iter_*"))
    assert len(saved) == 2 and 3 <= saved[0] < STEPS and saved[1] == STEPS, saved
    # Both runs append to one metrics file: 1..k before the signal, k+1..STEPS after the resume, each step once.
    assert steps(job_dir / "stage2" / "run" / "metrics.jsonl") == list(range(1, STEPS + 1))
    resumed = log[log.index(f"job {ids['stage2']} restart 1"):]
    loaded = rf"successfully loaded checkpoint from {re.escape(str(checkpoints))} .*at iteration {saved[0]}\n"
    assert re.search(loaded, resumed), resumed[-4000:]
