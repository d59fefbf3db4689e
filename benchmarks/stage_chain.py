"""The tiny variant through stages 1 -> 1.5 -> 2 -> 3 on 2 CPU cores, with held-out VQA beside its baselines.

    .venv/bin/python benchmarks/stage_chain.py [--root runs/stage_chain] [--steps 200 300 2000 5000] [--samples 200]
        [training overrides for every stage, e.g. model.kv_lora_rank=32]

Runs ``nemo_pixellm.pipeline`` with the recipe below (40,000 training images: with 4,000 the 5,000 stage-3
steps memorise them; 112-pixel views: one LM token per cell of the scenes' 4x4 grid; packing: a conversation
fills half of a 128-token sequence, a caption a third; global batch 32; EMA on),
then evaluates on the held-out split (never trained on):
- the final checkpoint with EMA weights and with the raw weights (the same run);
- the same checkpoint with every image blanked (the text-only baseline: what the question alone gives);
- an untrained model (one step at learning rate 0);
and prints one table with the chance rate (most frequent answer per question type).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["dataset.synthetic_train_samples=40000", "dataset.image_size=112", "model.vision_image_size=112",
          "dataset.pack=true", "train.global_batch_size=32", "train.micro_batch_size=32", "ema.enabled=true",
          "validation.eval_interval=null", "logger.log_interval=100"]
TYPES = ("count", "colour", "position", "relation", "ocr", "chart")
ASKED = ("count", "colour", "position", "ocr")  # the target: counting, colours, positions, short OCR


def evaluate(checkpoint: Path, samples: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "nemo_pixellm.evaluate", f"checkpoint={checkpoint}",
                          f"samples={samples}", *extra], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"checkpoint"')))


def asked_accuracy(vqa: dict) -> float:
    right = sum(vqa[t]["accuracy"] * vqa[t]["n"] for t in ASKED if t in vqa)
    return right / sum(vqa[t]["n"] for t in ASKED if t in vqa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "stage_chain")
    parser.add_argument("--steps", type=int, nargs=4, default=[200, 300, 2000, 5000])
    parser.add_argument("--samples", type=int, default=200, help="held-out images (all their questions)")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the chain already under --root")
    args, overrides = parser.parse_known_args()
    recipe = RECIPE + overrides

    start = time.time()
    if not args.evaluate_only:
        subprocess.run([sys.executable, "-m", "nemo_pixellm.pipeline", "stages=[stage1,stage1_5,stage2,stage3]",
                        f"steps=[{','.join(map(str, args.steps))}]", f"root={args.root}", "eval_samples=0", *recipe],
                       check=True, cwd=ROOT)
    chain_s = time.time() - start
    final = args.root / "stage3" / "checkpoints"

    untrained = args.root / "untrained"
    if not (args.evaluate_only and (untrained / "checkpoints").is_dir()):
        subprocess.run([sys.executable, "-m", "nemo_pixellm.train", "+stage=stage3", f"run_dir={untrained}",
                        f"checkpoint.save={untrained / 'checkpoints'}", "train.train_iters=1", "optimizer.lr=0",
                        "optimizer.min_lr=0", *recipe], check=True, cwd=ROOT, capture_output=True)

    reports = {
        "chain, EMA weights": evaluate(final, args.samples, "ema=true"),
        "chain, raw weights": evaluate(final, args.samples, "ema=false"),
        "chain, images blanked": evaluate(final, args.samples, "ema=true", "blind=true"),
        "untrained": evaluate(untrained / "checkpoints", args.samples),
    }
    if not args.evaluate_only:
        print(f"\nstage chain: {sum(args.steps)} steps in {chain_s / 60:.1f} min of wall time (training and "
              "checkpointing; evaluation after)")
    header = f"{'held-out exact match':24s}" + "".join(f"{t:>9s}" for t in TYPES) + f"{'asked':>9s}{'all':>9s}"
    print(header)
    any_vqa = next(iter(reports.values()))["vqa"]
    print(f"{'chance':24s}" + "".join(f"{any_vqa[t]['chance']:9.1%}" for t in TYPES))
    for name, report in reports.items():
        vqa = report["vqa"]
        print(f"{name:24s}" + "".join(f"{vqa[t]['accuracy']:9.1%}" for t in TYPES)
              + f"{asked_accuracy(vqa):9.1%}{vqa['all']['accuracy']:9.1%}")
    print(f"questions: {any_vqa['all']['n']} on {args.samples} held-out images; 'asked' = {'+'.join(ASKED)}")
    print(json.dumps({"chain_s": round(chain_s, 1), "steps": args.steps,
                      "reports": {k: v["vqa"] for k, v in reports.items()}}))


if __name__ == "__main__":
    main()
