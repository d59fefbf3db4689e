"""Slurm launcher: validate a training run for a cluster, render its sbatch script and submit it.

    python -m nemo_pixellm.launch +stage=stage2 variant=gigapixel cluster=h100 cluster.nodes=16 [--dry-run]
    python -m nemo_pixellm.launch stages=[stage1,stage1_5,stage2,stage3] variant=pixel cluster=h100

``cluster=`` / ``cluster.*`` / ``stages=`` compose conf/launch.yaml (the cluster group is conf/cluster/); every other
argument is a training override that goes unchanged onto the job's ``python -m nemo_pixellm.train`` line. Each stage
is composed and built exactly as its job will be (``build_config`` with the cluster's world size) and, on GPU
clusters, its per-GPU memory is estimated, so a job that cannot start is not submitted. ``--dry-run`` prints the
script(s) on stdout; otherwise each is written to ``<job_dir>/<stage>/job.sbatch`` and submitted with sbatch (a
chain with ``--dependency=afterok:<previous job>``), and the job ids are printed.

Every job saves to and resumes from ``<job_dir>/<stage>/checkpoints``: Slurm's warning signal (SIGUSR1,
``cluster.signal_seconds`` before the time limit) reaches Bridge's exit signal handler in every rank, which saves
a checkpoint and exits; the batch script then requeues the job, which resumes from that checkpoint.
"""

import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_pixellm import compat

compat.enable(entry_point=True)  # version check and CPU layer, before Megatron loads

from nemo_pixellm.stages import OWNED_KEYS, StageRun, key, plan_chain  # noqa: E402
from nemo_pixellm.training.config import CONF_DIR  # noqa: E402
from nemo_pixellm.training.validate import ConfigError  # noqa: E402

ROOT = CONF_DIR.parent
LAUNCHER_KEYS = ("cluster", "stages")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher overrides for conf/launch.yaml, training overrides for conf/config.yaml)."""
    launcher = [o for o in argv if key(o).split(".")[0] in LAUNCHER_KEYS]
    return launcher, [o for o in argv if o not in launcher]


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def plan_stages(launch, training: list[str]) -> list[StageRun]:
    """The chain's stages (or the one stage of +stage=), each job resuming from its own checkpoints."""
    for override in training:
        if key(override) in OWNED_KEYS:
            raise ConfigError(f"{key(override)} is set by the launcher (under cluster.job_dir); "
                              "drop it, or point cluster.job_dir elsewhere")
    chosen = [o.split("=", 1)[1] for o in training if key(o) == "stage"]
    names = list(launch.stages) if launch.stages else chosen
    if not names or (launch.stages and chosen):
        raise ConfigError("give either +stage=<name> or stages=[...] (a chain), e.g. stages=[stage1,stage1_5,stage2,stage3]")
    common = [*launch.cluster.train_overrides, *(o for o in training if key(o) != "stage")]
    return plan_chain(names, launch.cluster.job_dir, common, resume=True, where="cluster.job_dir")


def validate(launch, plan: list[StageRun]) -> str:
    """Build every stage's config as its job will (ConfigError if it cannot run); returns the layout and memory lines."""
    from nemo_pixellm.training.config import build_config

    cluster = launch.cluster
    world = cluster.nodes * cluster.tasks_per_node
    where = (f"{world} processes (cluster.nodes={cluster.nodes} x cluster.tasks_per_node={cluster.tasks_per_node} "
             f"on cluster '{cluster.name}')")
    containers = {}
    for stage in plan:
        # The checkpoint a chained stage starts from does not exist until the previous job has run.
        overrides = [o for o in stage.overrides if not (stage.chained and key(o) == "stage.init_from")]
        try:
            containers[stage.name] = build_config(_compose("config", overrides), world_size=world,
                                                  init_from_pending=stage.chained)
        except ConfigError as err:
            raise ConfigError(f"{stage.name} on {where}: {err}") from None
    container = next(iter(containers.values()))
    m = container.model
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    layout = (f"layout: TP={tp} PP={pp} CP={cp} EP={m.expert_model_parallel_size} "
              f"ETP={m.expert_tensor_parallel_size or tp} DP={world // (tp * pp * cp)} = {world} processes "
              f"({cluster.nodes} node(s) x {cluster.tasks_per_node})")
    memory = "memory: not checked (CPU cluster: cluster.gpu_memory_gb is null)"
    if cluster.gpu_memory_gb:
        from nemo_pixellm.info import meta_model
        from nemo_pixellm.training.memory import check_fits, estimate_memory, parameter_groups, unsharded

        # One model for every stage (stages change what trains, not its shape), counted as if all of it trains.
        groups = parameter_groups(meta_model(unsharded(container.model)))
        for name, stage_container in containers.items():
            estimate = estimate_memory(stage_container, world, groups)
            check_fits(estimate, cluster.gpu_memory_gb, stage_container, f"{name} on {where}")
        memory = f"memory (estimate): {estimate.describe(cluster.gpu_memory_gb)}"
    return f"{layout}\n{memory}"


def render(launch, stage: StageRun, summary: str) -> str:
    """The sbatch script of one stage."""
    c = launch.cluster
    python = c.python or sys.executable
    q = shlex.quote
    job_name = f"pixellm-{stage.name}"
    logs = Path(c.job_dir).absolute() / "logs"
    sbatch = [
        f"--job-name={job_name}",
        f"--nodes={c.nodes}",
        f"--ntasks-per-node={c.tasks_per_node}",
        *([f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []),
        f"--cpus-per-task={c.cpus_per_task}",
        *([f"--partition={c.partition}"] if c.partition else []),
        *([f"--account={c.account}"] if c.account else []),
        f"--time={c.time}",
        f"--output={logs}/%x-%j.out",
        "--open-mode=append",            # a requeued job continues the same log
        "--requeue",
        f"--signal=B:USR1@{c.signal_seconds}",  # to this batch shell, which forwards it to the training processes
        *c.sbatch_args,
    ]
    srun = ["srun", "--kill-on-bad-exit=1"]
    if c.container_image:
        srun += [f"--container-image={c.container_image}"]
        if c.container_mounts:
            srun += [f"--container-mounts={','.join(c.container_mounts)}"]
        if c.container_workdir:
            srun += [f"--container-workdir={c.container_workdir}"]
    train = [python, "-m", "nemo_pixellm.train", *stage.overrides, "train.exit_signal_handler=true"]
    env = "\n".join(f"export {k}={q(str(v))}" for k, v in c.env.items())
    comments = "\n".join(f"# {line}" for line in summary.splitlines())
    cd = "" if c.container_image else f"cd {q(str(ROOT))}\n"
    return f"""#!/bin/bash
# nemo_pixellm {stage.name} on cluster '{c.name}' (rendered by python -m nemo_pixellm.launch)
{comments}
{chr(10).join(f'#SBATCH {arg}' for arg in sbatch)}

{env}
{cd}# torch.distributed env:// rendezvous: the first node hosts it; each task sets its ranks from Slurm's below.
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
mkdir -p {q(str(stage.checkpoints))}   # an empty checkpoint.load starts fresh; after a requeue it holds the checkpoint to resume
echo "[launch] job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST ($SLURM_NTASKS tasks), master $MASTER_ADDR:$MASTER_PORT"

# Slurm's warning signal (or `scancel --batch --signal=USR1 <job>`) comes to this shell: pass it on to srun,
# which forwards it to every task; Bridge's exit signal handler saves a checkpoint and the tasks exit cleanly.
preempted=0
trap 'preempted=1; echo "[launch] SIGUSR1: checkpointing, then requeueing"; kill -USR1 "$srun_pid" 2>/dev/null' USR1

{' '.join(srun)} \\
  bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' task \\
  {' '.join(q(str(a)) for a in train)} &
srun_pid=$!
wait "$srun_pid"; rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done  # the trap interrupts wait: wait again

if (( preempted && rc == 0 )); then
  echo "[launch] checkpoint saved: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def submit(script_path: Path, dependency: str | None) -> str:
    cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{dependency}"] if dependency else []), str(script_path)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    launcher, training = split_overrides(argv)
    try:
        launch = _compose("launch", launcher)
        plan = plan_stages(launch, training)
        summary = validate(launch, plan)
    except (ConfigError, NotImplementedError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summary, file=sys.stderr, flush=True)

    job_id, previous = None, None
    for stage in plan:
        script = render(launch, stage, summary)
        if dry_run:
            dependency = f"--dependency=afterok:<job id of {previous}> " if previous else ""
            print(f"# ---- {stage.name}: sbatch {dependency}{stage.dir / 'job.sbatch'}\n{script}", flush=True)
            previous = stage.name
            continue
        stage.dir.mkdir(parents=True, exist_ok=True)
        (Path(launch.cluster.job_dir).absolute() / "logs").mkdir(parents=True, exist_ok=True)
        path = stage.dir / "job.sbatch"
        path.write_text(script)
        job_id = submit(path, job_id)
        print(f"{stage.name}: submitted job {job_id} ({path})", flush=True)


if __name__ == "__main__":
    main()
