"""The Slurm launcher without a cluster: rendered sbatch scripts (--dry-run), the layout and memory checks that
stop a job that cannot start, and the Dockerfile's pins."""

import re
import signal
import subprocess

import pytest

from conftest import ROOT, compose_cfg
from nemo_pixellm import launch
from nemo_pixellm.info import count_parameters, meta_model
from nemo_pixellm.training.config import build_config
from nemo_pixellm.training.memory import GIB, estimate_memory, parameter_groups, unsharded
from nemo_pixellm.training.validate import ConfigError


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))


H100 = ["cluster=h100", "seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=256"]

# The three reference deployments: pixel on one 8-GPU node, megapixel on 2 nodes, gigapixel on 16.
LAYOUTS = {
    "pixel": (["cluster.nodes=1", "model.expert_model_parallel_size=8"], "TP=1 PP=1 CP=1 EP=8 ETP=1 DP=8 = 8 "),
    "megapixel": (["cluster.nodes=2", "model.expert_model_parallel_size=16"], "TP=1 PP=1 CP=1 EP=16 ETP=1 DP=16 = 16 "),
    "gigapixel": (["cluster.nodes=16", "model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                   "model.pipeline_model_parallel_size=4", "model.expert_model_parallel_size=32"],
                  "TP=2 PP=4 CP=1 EP=32 ETP=1 DP=16 = 128 "),
}


def dry_run(argv, capsys) -> tuple[str, str]:
    """(the scripts launch prints on stdout, its layout and memory lines on stderr)."""
    launch.main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return out.out, out.err


def launch_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        launch.main([*argv, "--dry-run"])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def bash_syntax_ok(script: str) -> None:
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
def test_dry_run_renders_a_valid_gpu_job(variant, capsys):
    extra, layout = LAYOUTS[variant]
    script, summary = dry_run(["+stage=stage2", f"variant={variant}", *H100, *extra], capsys)
    print(f"{variant}:\n{summary}")
    bash_syntax_ok(script)
    assert layout in summary and layout in script  # stderr for the user, a comment in the script for the record
    used = float(re.search(r"memory \(estimate\): ([\d.]+) GiB per GPU of 79 GiB", summary).group(1))
    assert 5 < used < 79
    nodes = int(re.search(r"cluster.nodes=(\d+)", " ".join(extra)).group(1))
    sbatch = re.findall(r"^#SBATCH (\S+)", script, re.M)
    for option in (f"--nodes={nodes}", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=batch",
                   "--account=my_account", "--time=04:00:00", "--requeue", "--signal=B:USR1@600", "--exclusive"):
        assert option in sbatch
    assert any(o.startswith("--output=/lustre/fsw/my_account/pixellm/logs/") for o in sbatch)
    srun = script[script.index("\nsrun "):script.index("srun_pid=$!")]
    assert "--container-image=registry.example.com/my_account/nemo_pixellm:0.1.0" in srun
    assert "--container-mounts=/lustre/fsw/my_account:/lustre/fsw/my_account" in srun
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in srun
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script and "export NCCL_SOCKET_IFNAME='^lo,docker'" in script
    # The training line: the user's overrides, the cluster's, resume-from-own-checkpoint; no launcher keys.
    train = srun[srun.index("python -m nemo_pixellm.train"):].split()
    for arg in (f"variant={variant}", "+stage=stage2", "mixed_precision=bf16_mixed",
                "optimizer.use_distributed_optimizer=true", "train.exit_signal_handler=true",
                "checkpoint.save=/lustre/fsw/my_account/pixellm/stage2/checkpoints",
                "checkpoint.load=/lustre/fsw/my_account/pixellm/stage2/checkpoints", *extra[1:]):
        assert arg in train
    assert not [a for a in train if a.startswith(("cluster", "stages", "--dry-run"))]


def test_chain_submits_dependent_stages_from_previous_checkpoints(capsys, tmp_path):
    stages = ["stage1", "stage1_5", "stage2", "stage3"]
    earlier = tmp_path / "earlier-run"  # a user's stage.init_from must be a checkpoint; the chain's own appear as it runs
    earlier.mkdir()
    (earlier / "latest_checkpointed_iteration.txt").write_text("100")
    out, _ = dry_run([f"stages=[{','.join(stages)}]", "cluster=local_slurm", f"cluster.job_dir={tmp_path}",
                      f"stage.init_from={earlier}"], capsys)
    parts = re.split(r"^# ---- (\w+): sbatch (.*)$", out, flags=re.M)[1:]
    assert [parts[i] for i in range(0, len(parts), 3)] == stages
    for i, stage in enumerate(stages):
        sbatch_line, script = parts[3 * i + 1], parts[3 * i + 2]
        bash_syntax_ok(script)
        assert f"+stage={stage}" in script and f"checkpoint.save={tmp_path}/{stage}/checkpoints" in script
        init_from = re.findall(r"stage\.init_from=(\S+)", script)
        if i == 0:
            assert "--dependency" not in sbatch_line and init_from == [str(earlier)]
        else:
            assert f"--dependency=afterok:<job id of {stages[i - 1]}>" in sbatch_line
            assert init_from == [f"{tmp_path}/{stages[i - 1]}/checkpoints"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["variant=pixel", "cluster.nodes=1", "model.pipeline_model_parallel_size=3"],
         r"cluster.nodes=1 x cluster.tasks_per_node=8 .*world size 8 is not divisible by TP\*PP\*CP = 1\*3\*1 = 3"),
        (["variant=gigapixel", "cluster.nodes=16", "model.expert_model_parallel_size=64"],
         r"model.expert_model_parallel_size=64 does not divide the 288 experts; valid sizes: \[1, 2, 3, 4, 6, 8, 9,"),
        (["variant=pixel", "cluster.nodes=1", "model.expert_model_parallel_size=16"],
         r"EP\*ETP = 16\*1 must divide TP\*CP\*DP = 1\*1\*8 \(8 processes\): lower model.expert_model_parallel_size"),
        (["variant=megapixel", "cluster.nodes=2", "model.tensor_model_parallel_size=3", "model.sequence_parallel=true"],
         "world size 16 is not divisible"),
        (["variant=pixel", "cluster.nodes=1", "checkpoint.save=/elsewhere"], "checkpoint.save is set by the launcher"),
        # Data errors too are caught on the login node, before any allocation.
        (["variant=pixel", "cluster.nodes=1", "dataset.path=/no/such/shards"],
         "no manifest.json in /no/such/shards: point dataset.path at a directory written by data_prep"),
        (["variant=pixel", "cluster.nodes=1", "dataset.task=text"], "dataset.task=text trains on text-only records"),
    ],
)
def test_layout_that_cannot_run_is_refused(argv, message, capsys):
    err = launch_error(["+stage=stage2", *H100, *argv], capsys)
    assert re.search(message, err), err


def test_variant_that_does_not_fit_gpu_memory_is_refused(capsys):
    # GigaPixel's 163B routed-expert parameters over 8 expert ranks: far beyond 80 GB per GPU.
    err = launch_error(["+stage=stage2", "variant=gigapixel", *H100, "cluster.nodes=1",
                        "model.expert_model_parallel_size=8"], capsys)
    print(err)
    assert "stage2 on 8 processes (cluster.nodes=1 x cluster.tasks_per_node=8 on cluster 'h100') does not fit in GPU memory" in err
    assert "raise model.expert_model_parallel_size (now 8; a divisor of 288" in err
    assert "raise cluster.nodes" in err
    total = float(re.search(r"about ([\d.]+) GiB per GPU of 79 GiB", err).group(1))
    assert total > 79


def test_memory_estimate_counts_every_parameter_once(capsys):
    """The groups cover the model as info counts it; expert and optimizer terms shard as the layout says."""
    def container(*overrides):
        cfg = compose_cfg(["+stage=stage2", "variant=pixel", "seq_length=4096", "train.micro_batch_size=1",
                           "train.global_batch_size=256", "mixed_precision=bf16_mixed", *overrides])
        return build_config(cfg, world_size=8)

    base = container("model.expert_model_parallel_size=8")
    model = meta_model(unsharded(base.model))
    groups = parameter_groups(model)
    counts = count_parameters(model, base.model)
    assert sum(groups.values()) == counts["llm_total_untied"] + counts["vision"] + counts["projector"]
    h, experts, ffn, layers = 1024, 288, 832, 8
    assert groups["layers", "expert"] == layers * experts * 3 * h * ffn  # SwiGLU experts: fc1 2hf + fc2 hf
    dense = sum(n for (where, how), n in groups.items() if how != "expert")

    est = estimate_memory(base, 8, groups)  # PP=1, TP=1: all dense weights on each GPU, experts / 8
    assert est.weights_and_grads * GIB == pytest.approx((dense + groups["layers", "expert"] / 8) * (2 + 4))
    assert est.optimizer * GIB == pytest.approx((dense + groups["layers", "expert"] / 8) * 12)  # not sharded
    sharded = estimate_memory(container("model.expert_model_parallel_size=8",
                                        "optimizer.use_distributed_optimizer=true"), 8, groups)
    # Distributed optimizer: dense states over DP=8, expert states over expert-DP = 8 / EP = 1.
    assert sharded.optimizer * GIB == pytest.approx(dense * 12 / 8 + groups["layers", "expert"] / 8 * 12)
    assert sharded.weights_and_grads == est.weights_and_grads
    # CP=2: each rank holds half of every sequence's language-model activations (the vision tower runs whole)
    cp2 = estimate_memory(container("model.expert_model_parallel_size=8", "model.context_parallel_size=2"), 8, groups)
    assert est.activations / 2 < cp2.activations < est.activations


def test_slurm_jobs_turn_on_bridges_exit_signal_handler(tmp_path):
    """The job line's train.exit_signal_handler=true arms Bridge's handler for Slurm's SIGUSR1, data workers too."""
    job = ["+stage=stage2", "train.exit_signal_handler=true", f"checkpoint.save={tmp_path}", f"checkpoint.load={tmp_path}"]
    train = build_config(compose_cfg(job), world_size=1).train
    assert (train.exit_signal, train.exit_signal_handler, train.exit_signal_handler_for_dataloader) == (
        signal.SIGUSR1, True, True)
    with pytest.raises(ConfigError, match="train.exit_signal=SIGFOO is not a signal name"):
        build_config(compose_cfg(["+stage=stage2", "train.exit_signal=SIGFOO"]), world_size=1)


def test_dockerfile_installs_the_project_pins():
    """The image installs the CPU lock's exact versions (minus what the NGC base builds) and runs the trainer."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements/lock-cpu.txt").read_text(), re.M))
    setup_py = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[\w+\])?==([^"]+)"', (ROOT / "setup.py").read_text()))
    by_hand = dict(re.findall(r"([a-z0-9-]+)==([0-9][^\s\\]*)", (ROOT / "scripts/setup_env.sh").read_text()))
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", dockerfile, re.M)

    # The lock filter, applied exactly as the Dockerfile's grep -v -E does it.
    provided = re.search(r'^ARG NGC_PROVIDED="(.+)"$', dockerfile, re.M).group(1)
    assert 'grep -v -E "$NGC_PROVIDED" requirements/lock-cpu.txt' in dockerfile
    installed = {name: v for name, v in lock.items() if not re.search(provided, f"{name}=={v}")}
    assert "torch" not in installed and "nvidia-nccl-cu13" not in installed and "triton" not in installed
    for name, version in setup_py.items():
        if name in ("torch", "transformer-engine", "flash-attn"):  # built by NVIDIA into the base image
            continue
        if name in lock:
            assert installed.get(name) == version, f"{name}: setup.py {version}, image {installed.get(name)}"
    for name in ("megatron-core", "megatron-bridge", "transformers", "hydra-core", "numpy", "megatron-energon"):
        assert installed[name] == lock[name]

    # Pins written in the Dockerfile itself equal the project's.
    for name, version in re.findall(r"([a-z0-9-]+)==([0-9][^\s\\]*)", dockerfile):
        assert version == {**lock, **setup_py, **by_hand}[name], name
    assert {"fast-hadamard-transform", "nvidia-resiliency-ext"} <= set(re.findall(r"([a-z0-9-]+)==", dockerfile))
    assert "pip install --no-cache-dir --no-deps -e ." in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "nemo_pixellm.train"]' in dockerfile
