"""The stage chain, once: which stages run, in which order, under which directories, each from the previous
stage's checkpoints. ``pipeline`` runs the plan here, ``launch`` renders one Slurm job per stage from it, and
benchmarks/stage_chain.py runs ``pipeline``.

Stage k of a chain under ``root`` trains in ``<root>/<stage>/run`` (metrics.jsonl, TensorBoard), saves to
``<root>/<stage>/checkpoints``, and k > 1 starts from ``stage.init_from=<root>/<stage k-1>/checkpoints``
(weights only; a user's own ``stage.init_from`` applies to the first stage).
"""

from dataclasses import dataclass
from pathlib import Path

STAGES = ("stage1", "stage1_5", "stage2", "stage3", "stage4")
OWNED_KEYS = ("run_dir", "checkpoint.save", "checkpoint.load")  # set per stage from the chain's root


def key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass(frozen=True)
class StageRun:
    name: str
    dir: Path
    overrides: list[str]  # the stage's `python -m nemo_pixellm.train` arguments
    chained: bool  # starts from the previous stage's checkpoints, which exist only once that stage has run

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"


def plan_chain(names: list[str], root, common: list[str], per_stage: list[list[str]] | None = None,
               resume: bool = False, where: str = "the chain's root") -> list[StageRun]:
    """The chain's stages in order. ``common``: training overrides for every stage; ``per_stage``: each stage's
    own; ``resume``: each stage also resumes from its own checkpoints (a requeued Slurm job)."""
    from nemo_pixellm.training.validate import ConfigError  # here: `pipeline` starts without Megatron

    for override in [*common, *(o for own in per_stage or [] for o in own)]:
        if key(override) in OWNED_KEYS:
            raise ConfigError(f"{key(override)} is set per stage under {where}; drop it, or choose another root")
        if key(override) == "stage":
            raise ConfigError("the chain names its stages: drop +stage=")
    if not names:
        raise ConfigError("no stages: give e.g. stages=[stage1,stage1_5,stage2,stage3]")
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"unknown stage '{name}': choose from {', '.join(STAGES)}")
    if per_stage is not None and len(per_stage) != len(names):
        raise ConfigError(f"{len(per_stage)} per-stage settings for {len(names)} stages")
    root = Path(root).absolute()
    plan, previous = [], None
    for i, name in enumerate(names):
        stage_dir = root / name
        own = [o for o in common if i == 0 or key(o) != "stage.init_from"]
        checkpoints = stage_dir / "checkpoints"
        overrides = [*own, *(per_stage[i] if per_stage else []), f"+stage={name}", f"run_dir={stage_dir / 'run'}",
                     f"checkpoint.save={checkpoints}", *([f"checkpoint.load={checkpoints}"] if resume else [])]
        if previous is not None:
            overrides.append(f"stage.init_from={previous}")
        plan.append(StageRun(name, stage_dir, overrides, chained=previous is not None))
        previous = checkpoints
    return plan
