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
exact match of the start and each arm, each arm's gain on the start's two weakest types, DPO's held-out
preference accuracy. Issue 15's targets: GRPO at least 5 points above the control on the weakest types; DPO at
95 % held-out preference accuracy or more with exact match within 1 point of the start. Run it alone.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_chain import RECIPE, TYPES, evaluate  # noqa: E402  (one recipe and one evaluation for both benchmarks)

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"sft": ["+stage=stage3"], "grpo": ["+stage=stage4", "stage.algorithm=grpo"],
        "dpo": ["+stage=stage4", "stage.algorithm=dpo"]}
# after the recipe (which turns validation off): DPO's held-out pairs give its preference accuracy
AFTER_RECIPE = {"dpo": ["validation.eval_interval=25"]}


def train_arm(name: str, start: Path, root: Path, minutes: float, overrides: list[str]) -> tuple[Path, float, str]:
    run_dir = root / name
    command = [sys.executable, "-m", "nemo_pixellm.train", *ARMS[name], f"stage.init_from={start}",
               f"run_dir={run_dir}", f"checkpoint.save={run_dir / 'checkpoints'}", "train.train_iters=1000000",
               f"+train.exit_duration_in_mins={minutes}", "checkpoint.save_interval=1000000", *RECIPE,
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


def weakest(vqa: dict, n: int = 2) -> list[str]:
    return sorted((t for t in TYPES if t in vqa), key=lambda t: vqa[t]["accuracy"])[:n]


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
    for arm in ARMS:
        parser.add_argument(f"--{arm}", nargs="*", default=[], metavar="KEY=VALUE", help=f"overrides for {arm}")
    args = parser.parse_args()
    start = args.chain / "stage3" / "checkpoints"
    if not start.is_dir():
        sys.exit(f"no stage-3 checkpoint at {start}: run benchmarks/stage_chain.py --root {args.chain} first")
    root = args.root or args.chain / "stage4_vs_sft"

    reports = {"start (stage-3 raw weights)": evaluate(start, args.samples, "ema=false")["vqa"]}
    notes = {}
    for arm in args.arms:
        checkpoint, seconds, stdout = train_arm(arm, start, root, args.minutes, getattr(args, arm))
        reports[arm] = evaluate(checkpoint, args.samples, "ema=false")["vqa"]
        notes[arm] = {"seconds": round(seconds), "steps": steps_done(root / arm)}
        if arm == "dpo":
            notes[arm]["heldout_preference_accuracy"] = heldout_preference_accuracy(stdout)
        (root / "results.json").write_text(json.dumps({"arms": notes, "reports": reports}))  # kept arm by arm

    base = reports["start (stage-3 raw weights)"]
    low = weakest(base)
    print(f"\n{'held-out exact match':28s}" + "".join(f"{t:>9s}" for t in TYPES) + f"{'weakest':>9s}{'all':>9s}")
    for name, vqa in reports.items():
        print(f"{name:28s}" + "".join(f"{vqa[t]['accuracy']:9.1%}" if t in vqa else f"{'-':>9s}" for t in TYPES)
              + f"{mean_accuracy(vqa, low):9.1%}{vqa['all']['accuracy']:9.1%}")
    print(f"weakest types of the start: {'+'.join(low)}; {base['all']['n']} questions on {args.samples} images")
    for arm, note in notes.items():
        gain = mean_accuracy(reports[arm], low) - mean_accuracy(base, low)
        line = f"{arm}: {note['steps']} steps in {note['seconds'] / 60:.1f} min, weakest types {gain:+.1%} vs start"
        if "sft" in reports and arm != "sft":
            line += f", {mean_accuracy(reports[arm], low) - mean_accuracy(reports['sft'], low):+.1%} vs sft"
        if arm == "dpo":
            accuracy = note["heldout_preference_accuracy"]
            line += f", held-out preference accuracy {accuracy:.1%}" if accuracy is not None else ", no validation"
            line += f", all-types exact match {reports[arm]['all']['accuracy'] - base['all']['accuracy']:+.1%}"
        print(line)
    print(json.dumps({"minutes": args.minutes, "weakest": low, "arms": notes, "reports": reports}))


if __name__ == "__main__":
    main()
