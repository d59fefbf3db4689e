"""Run the training stages in order, each from the previous stage's checkpoint, then evaluate each one.

    python -m nemo_pixellm.pipeline stages=[stage1,stage1_5,stage2,stage3] root=runs/chain \
        [steps=[200,200,400,400]] [eval_samples=200] [any training override, e.g. ema.enabled=true]
        [<stage>:<override> for that stage only, e.g. stage2:stage.vision_lr_mult=0.1]

Every stage is a ``python -m nemo_pixellm.train`` process with its own stage config (data, frozen set,
learning rate, schedule) plus ``train.train_iters``/``scheduler.lr_decay_iters`` from ``steps`` and every
other argument as a training override; directories and hand-offs are ``nemo_pixellm.stages``' (stage k > 1
starts from ``<root>/<stage k-1>/checkpoints``; metrics in ``<root>/<stage>/run``).
Prints one row per stage: steps, wall time, final training loss, held-out VQA accuracy.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from nemo_pixellm.stages import plan_chain

DEFAULT_STAGES = ["stage1", "stage1_5", "stage2", "stage3"]


def final_loss(run_dir: Path) -> float:
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[-1])["loss"]


def split_stage_overrides(stages: list[str], extra: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every stage, and those written ``<stage>:<override>`` for that stage alone."""
    common, own = [], {name: [] for name in stages}
    for override in extra:
        name, sep, rest = override.partition(":")
        if not sep or "=" in name:  # a value may hold ':' (e.g. a path); a stage prefix comes before any '='
            common.append(override)
        elif name in own:
            own[name].append(rest)
        else:
            raise SystemExit(f"error: {override} names stage '{name}', which is not in this chain ({', '.join(stages)})")
    return common, own


def run(stages: list[str], root: Path, steps: list[int], extra: list[str], eval_samples: int) -> list[dict]:
    if len(steps) != len(stages):
        raise SystemExit(f"error: steps has {len(steps)} entries for {len(stages)} stages")
    extra, own = split_stage_overrides(stages, extra)
    per_stage = [[f"train.train_iters={n}", f"scheduler.lr_decay_iters={n}", *own[name]]
                 for name, n in zip(stages, steps)]
    try:
        plan = plan_chain(stages, root, extra, per_stage, where="root")
    except ValueError as error:  # ConfigError
        raise SystemExit(f"error: {error}") from None
    rows = []
    for stage, n in zip(plan, steps):
        start = time.time()
        subprocess.run([sys.executable, "-m", "nemo_pixellm.train", *stage.overrides], check=True, env=os.environ.copy())
        wall = time.time() - start
        row = {"stage": stage.name, "steps": n, "wall_s": round(wall, 1), "final_loss": final_loss(stage.run_dir)}
        if eval_samples:
            output = subprocess.run([sys.executable, "-m", "nemo_pixellm.evaluate",
                                     f"checkpoint={stage.checkpoints}", f"samples={eval_samples}"],
                                    check=True, capture_output=True, text=True).stdout.splitlines()
            report = json.loads(next(line for line in output if line.startswith('{"checkpoint"')))
            row["heldout_accuracy"] = report["vqa"]["all"]["accuracy"]
        rows.append(row)
    return rows


PIPELINE_KEYS = ("stages", "steps", "root", "eval_samples")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own = [a for a in argv if a.split("=", 1)[0] in PIPELINE_KEYS]
    args = OmegaConf.from_dotlist(own)
    stages = list(args.get("stages", DEFAULT_STAGES))
    steps = list(args.get("steps", [100] * len(stages)))
    rows = run(stages, Path(args.get("root", "runs/chain")), steps, [a for a in argv if a not in own],
               int(args.get("eval_samples", 200)))
    print(f"{'stage':10s} {'steps':>6s} {'wall s':>8s} {'final loss':>11s} {'held-out acc':>13s}")
    for r in rows:
        acc = f"{r['heldout_accuracy']:.1%}" if "heldout_accuracy" in r else "-"
        print(f"{r['stage']:10s} {r['steps']:6d} {r['wall_s']:8.1f} {r['final_loss']:11.4f} {acc:>13s}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
