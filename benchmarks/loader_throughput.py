"""Data loader throughput beside the tiny model's consumption rate, on this machine.

    .venv/bin/python benchmarks/loader_throughput.py [--sequences 400] [--workers 0 2] [--train-steps 30]
                                                     [--resume-at 0]

Loader: stage 2's data (synthetic, 70:30 vision-language : text) through ``TrainingSequences`` and torch's
DataLoader, unpacked and packed; samples/s and non-padding tokens/s. Model: a short ``nemo_pixellm.train``
run of the tiny variant, whose tokens/s the progress line reports (padding included, as it is computed).
Resume (``--resume-at N``): seconds until a fresh dataset yields sequence N (a run resumed there), with an
empty plan cache and with the block starts the first one wrote.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nemo_pixellm import compat

compat.enable()

from nemo_pixellm.data import sources  # noqa: E402
from nemo_pixellm.data.provider import PixelLMDataConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(pack: bool, workers: int, sequences: int) -> dict:
    config = PixelLMDataConfig(seq_length=128, max_tiles=0, text_ratio=0.3, pack=pack, global_batch_size=8)
    tokenizer = sources.load_tokenizer(config)
    dataset = sources.train_dataset(config, tokenizer, sequences)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers,
                                         collate_fn=dataset.collate_fn)
    start, samples, tokens = time.time(), 0, 0
    for batch in loader:
        samples += sum(len(s) for s in batch["samples"])
        tokens += sum(p.tokens for s in batch["samples"] for p in s)
    seconds = time.time() - start
    return {"pack": pack, "workers": workers, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def resume_seconds(index: int) -> tuple[float, float]:
    config = PixelLMDataConfig(seq_length=128, max_tiles=0, text_ratio=0.3, pack=True, global_batch_size=32)
    tokenizer = sources.load_tokenizer(config)
    seconds = []
    with tempfile.TemporaryDirectory() as plans:
        for _ in ("empty cache", "cached"):
            dataset = sources.train_dataset(config, tokenizer, index + 1)
            dataset._plan_dir = Path(plans) / dataset._plan_dir.name  # a private cache, empty at first
            start = time.time()
            dataset[index]
            seconds.append(time.time() - start)
    return seconds[0], seconds[1]


def model_rate(steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-m", "nemo_pixellm.train", "+stage=stage2", f"train.train_iters={steps}",
                          "validation.eval_interval=null", f"logger.log_interval={steps}", "run_dir=/tmp/pixellm-bench"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return float(re.findall(r"\| ([\d,]+) tokens/s", out)[-1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--train-steps", type=int, default=30, help="0: no model run")
    parser.add_argument("--resume-at", type=int, default=0, help="also time reaching this sequence index")
    args = parser.parse_args()
    if args.resume_at:
        cold, cached = resume_seconds(args.resume_at)
        print(f"resume at sequence {args.resume_at:,}: {cold:.1f} s with an empty plan cache, {cached:.2f} s cached")
    for workers in args.workers:
        for pack in (False, True):
            r = loader_rate(pack, workers, args.sequences)
            print(f"loader pack={pack!s:5} workers={workers}: {r['samples_per_s']:8.1f} samples/s "
                  f"{r['tokens_per_s']:10.0f} tokens/s")
    if args.train_steps:
        print(f"tiny model (stage 2, 1 process, fp32): {model_rate(args.train_steps):10.0f} tokens/s consumed")


if __name__ == "__main__":
    main()
