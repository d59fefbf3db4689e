"""Stage 4 (GRPO, DPO) against more stage 3 on the same minutes, from the stage chain's stage-3 checkpoint.

    .venv/bin/python benchmarks/stage4_vs_sft.py [--chain runs/stage_chain] [--minutes 20] [--samples 200]
        [--arms sft grpo dpo] [--grpo key=value ...] [--dpo key=value ...] [--sft key=value ...]

Needs benchmarks/stage_chain.py's output under --chain (its stage-3 checkpoint; about 30 minutes to make).
Each arm trains for --minutes of wall time (Bridge's train.exit_duration_in_mins, which saves on exit) from that
checkpoint's raw weights (what stage.init_from loads), EMA off, with stage_chain's data recipe:
- sft: stage 3 continued: the control, what the same minutes of supervised steps give;
- grpo: stage 4 GRPO, exact-match reward on the synthetic questions;
- dpo: stage 4 DPO on synthetic pairs; its held-out preference accuracy is Bridge's last validation print.
Then every checkpoint is evaluated on the held-out split as stage_chain does. Printed side by side: per-type
exact match of the start and each arm, each arm's gain on --targets (issue 15's weakest types: position and
colour of a named object) and its largest loss on any type, DPO's held-out preference accuracy. Issue 15's
targets: GRPO at least 5 points above the start on the targets, no type more than 1 point down, the control
beside it; DPO at 95 % held-out preference accuracy or more with exact match within 1 point of the start. Run it
alone.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_chain import RECIPE, STAGES, TYPES, evaluate  # noqa: E402  (one recipe and one evaluation for both benchmarks)

from nemo_pixellm.pipeline import split_stage_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"sft": ["+stage=stage3"], "grpo": ["+stage=stage4", "stage.algorithm=grpo"],
        "dpo": ["+stage=stage4", "stage.algorithm=dpo"]}
# after the recipe (which turns validation off): DPO's held-out pairs give its preference accuracy
AFTER_RECIPE = {"dpo": ["validation.eval_interval=25"]}


def train_arm(name: str, start: Path, root: Path, minutes: float, overrides: list[str]) -> tuple[Path, float, str]:
    run_dir = root / name
    common, own = split_stage_overrides(list(STAGES), RECIPE)  # the SFT arm continues stage 3 as the chain ran it
    recipe = common + (own["stage3"] if name == "sft" else [])
    command = [sys.executable, "-m", "nemo_pixellm.train", *ARMS[name], f"stage.init_from={start}",
               f"run_dir={run_dir}", f"checkpoint.save={run_dir / 'checkpoints'}", "train.train_iters=1000000",
               f"+train.exit_duration_in_mins={minutes}", "checkpoint.save_interval=1000000", *recipe,
               "ema.enabled=false", *AFTER_RECIPE.get(name, []), *overrides]
    t0 = time.time()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (run_dir / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"{name} failed (exit {out.returncode}); its log: {run_dir / 'train.log'}\n{out.stderr[-2000:]}")
    return run_dir / "checkpoints", time.time() - t0, out.stdout


def steps_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def heldout_preference_accuracy(stdout: str) -> float | None:
    """The last 'validation loss at iteration N | ... preference_accuracy value: X' Bridge printed."""
    found = re.findall(r"validation loss at iteration \d+.*?preference_accuracy value: ([0-9.eE+-]+)", stdout)
    return float(found[-1]) if found else None


def heldout_questions(checkpoint: Path) -> Path:
    """The held-out VQA split of the chain's stage 3: every arm is asked these (an arm trained on other data,
    e.g. DPO on model-made pairs with their own held-out pairs, records that data in its checkpoint instead)."""
    from nemo_pixellm.data import sources
    from nemo_pixellm.evaluate import saved_data_config  # (enables the plugin's compatibility layer first)
    from nemo_pixellm.training.checkpoints import iteration_dir

    return sources.data_paths(saved_data_config(iteration_dir(checkpoint)))[1]


def largest_drop(vqa: dict, base: dict) -> tuple[float, str]:
    """(largest loss of exact match on any question type, that type) against ``base``."""
    return max((base[t]["accuracy"] - vqa[t]["accuracy"], t) for t in TYPES if t in vqa and t in base)


def mean_accuracy(vqa: dict, types: list[str]) -> float:
    right = sum(vqa[t]["accuracy"] * vqa[t]["n"] for t in types)
    return right / sum(vqa[t]["n"] for t in types)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=Path, default=ROOT / "runs" / "stage_chain")
    parser.add_argument("--root", type=Path, default=None, help="where the arms run (default <chain>/stage4_vs_sft)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=200, help="held-out images (all their questions)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--targets", nargs="+", choices=TYPES, default=["position", "colour"],
                        help="the question types whose gain is the result (issue 15: position, colour)")
    for arm in ARMS:
        parser.add_argument(f"--{arm}", nargs="*", default=[], metavar="KEY=VALUE", help=f"overrides for {arm}")
    args = parser.parse_args()
    start = args.chain / "stage3" / "checkpoints"
    if not start.is_dir():
        sys.exit(f"no stage-3 checkpoint at {start}: run benchmarks/stage_chain.py --root {args.chain} first")
    root = args.root or args.chain / "stage4_vs_sft"

    questions = f"data={heldout_questions(start)}"
    start_report = root / f"start-{args.samples}.json"  # the start's evaluation, made once per --root
    if not start_report.exists():
        start_report.parent.mkdir(parents=True, exist_ok=True)
        start_report.write_text(json.dumps(evaluate(start, args.samples, "ema=false", questions)["vqa"]))
    reports = {"start (stage-3 raw weights)": json.loads(start_report.read_text())}
    notes = {}
    for arm in args.arms:
        checkpoint, seconds, stdout = train_arm(arm, start, root, args.minutes, getattr(args, arm))
        reports[arm] = evaluate(checkpoint, args.samples, "ema=false", questions)["vqa"]
        notes[arm] = {"seconds": round(seconds), "steps": steps_done(root / arm)}
        if arm == "dpo":
            notes[arm]["heldout_preference_accuracy"] = heldout_preference_accuracy(stdout)
        (root / "results.json").write_text(json.dumps({"arms": notes, "reports": reports}))  # kept arm by arm

    base = reports["start (stage-3 raw weights)"]
    low = args.targets
    print(f"\n{'held-out exact match':28s}" + "".join(f"{t:>9s}" for t in TYPES) + f"{'targets':>9s}{'all':>9s}")
    for name, vqa in reports.items():
        print(f"{name:28s}" + "".join(f"{vqa[t]['accuracy']:9.1%}" if t in vqa else f"{'-':>9s}" for t in TYPES)
              + f"{mean_accuracy(vqa, low):9.1%}{vqa['all']['accuracy']:9.1%}")
    print(f"targets: {'+'.join(low)}; {base['all']['n']} questions on {args.samples} images")
    for arm, note in notes.items():
        gain = mean_accuracy(reports[arm], low) - mean_accuracy(base, low)
        drop, dropped = largest_drop(reports[arm], base)
        line = (f"{arm}: {note['steps']} steps in {note['seconds'] / 60:.1f} min, targets {gain:+.1%} vs start, "
                f"largest loss {drop:.1%} ({dropped})")
        if "sft" in reports and arm != "sft":
            line += f", targets {mean_accuracy(reports[arm], low) - mean_accuracy(reports['sft'], low):+.1%} vs sft"
        if arm == "dpo":
            accuracy = note["heldout_preference_accuracy"]
            line += f", held-out preference accuracy {accuracy:.1%}" if accuracy is not None else ", no validation"
            line += f", all-types exact match {reports[arm]['all']['accuracy'] - base['all']['accuracy']:+.1%}"
        print(line)
    print(json.dumps({"minutes": args.minutes, "targets": low, "arms": notes, "reports": reports}))


if __name__ == "__main__":
    main()
