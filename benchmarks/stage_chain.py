"""The tiny variant through stages 1 -> 1.5 -> 2 -> 3 on 2 CPU cores, with held-out VQA beside its baselines.

    .venv/bin/python benchmarks/stage_chain.py [--root runs/stage_chain] [--steps 50 50 2000 4000] [--samples 200]
        [--tower-steps 2000] [--seeds 1 2 3]
        [training overrides for every stage, e.g. model.kv_lora_rank=32, or stage2:<override> for one]

Runs ``nemo_pixellm.pipeline`` with the recipe below (40,000 training images: with 4,000 the 5,000 stage-3
steps memorise them; 112-pixel views: one LM token per cell of the scenes' 4x4 grid; packing: a conversation
fills half of a 128-token sequence, a caption a third; global batch 32; EMA on; a 3-layer decoder (dense, MoE,
MoE: with the tiny variant's 2 layers the colour lookup formed on one seed of three); each image token's place
as a fixed code in its last channels (left/right answers were at chance without it); conversations as 30% of
stage 2; the tower at a tenth of stage 3's learning rate), after the tower's own pretraining
(``nemo_pixellm.vision_pretrain``, ``--tower-steps``, counted in the chain's time: the tiny variant's
stand-in for the SigLIP tower the real variants start from; without it OCR stayed near chance),
then evaluates on the held-out split (never trained on):
- the final checkpoint with EMA weights and with the raw weights (the same run);
- the same checkpoint with every image blanked (the text-only baseline: what the question alone gives);
- an untrained model (one step at learning rate 0);
and prints one table with the chance rate (most frequent answer per question type).

With ``--seeds`` the chain runs once per seed (``rng.seed``: initial weights and data order; the data sets stay
the same) under ``<root>/seed-<n>``, and the table gets every seed's rows plus the mean and the minimum. Every
run also writes ``<root>/stage_chain.csv`` (one row per seed, arm and question type) and ``<root>/stage_chain.png``:
the training loss through the stages, and held-out accuracy per question type over the chain's steps (asked
every ``vqa_eval.interval`` steps on ``vqa_eval.samples`` held-out images; the EMA weights).
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nemo_pixellm.pipeline import split_stage_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["dataset.synthetic_train_samples=40000", "dataset.image_size=112", "model.vision_image_size=112",
          "dataset.pack=true", "train.global_batch_size=32", "train.micro_batch_size=32", "ema.enabled=true",
          "validation.eval_interval=null", "logger.log_interval=100", "vqa_eval.interval=500", "vqa_eval.samples=40",
          "model.num_layers=3", "model.moe_layer_freq=[0,1,1]", "model.image_position_code=true",
          "stage2:dataset.chat_ratio=0.3", "stage3:stage.vision_lr_mult=0.1"]
STAGES = ("stage1", "stage1_5", "stage2", "stage3")
TYPES = ("count", "colour", "position", "relation", "ocr", "chart")
ASKED = ("count", "colour", "position", "ocr")  # the target: counting, colours, positions, short OCR


def evaluate(checkpoint: Path, samples: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "nemo_pixellm.evaluate", f"checkpoint={checkpoint}",
                          f"samples={samples}", *extra], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"checkpoint"')))


def asked_accuracy(vqa: dict) -> float:
    right = sum(vqa[t]["accuracy"] * vqa[t]["n"] for t in ASKED if t in vqa)
    return right / sum(vqa[t]["n"] for t in ASKED if t in vqa)


def share_right(answers: list[dict]) -> dict:
    return {"n": len(answers), "accuracy": sum(a["score"] for a in answers) / max(len(answers), 1)}


def colour_object(question: str) -> str:
    """What a colour question asks about: a scene's shape, a chart's lettered bar or a line of text."""
    return "bar" if " bar " in question else "text" if " text " in question else "shape"


def run_chain(root: Path, steps: list[int], tower_steps: int, samples: int, recipe: list[str],
              evaluate_only: bool) -> dict:
    """One chain under ``root`` and its four evaluations: {"chain_s", "reports": {arm: per-type summary}}.
    The untrained model (one step at learning rate 0) comes first: it builds the data sets into the cache,
    which the chain's wall time then leaves out (data preparation, as data_prep is for real data)."""
    untrained = root / "untrained"
    common, own = split_stage_overrides(list(STAGES), recipe)  # the baseline is a stage-3 run
    if not (evaluate_only and (untrained / "checkpoints").is_dir()):
        subprocess.run([sys.executable, "-m", "nemo_pixellm.train", "+stage=stage3", f"run_dir={untrained}",
                        f"checkpoint.save={untrained / 'checkpoints'}", "train.train_iters=1", "optimizer.lr=0",
                        "optimizer.min_lr=0", "vqa_eval.interval=null", "dataset.text_ratio=0.3", *common,
                        *own["stage3"]],
                       check=True, cwd=ROOT, capture_output=True)
    start = time.time()
    if not evaluate_only:
        tower = root / "tower"
        if tower_steps:
            shutil.rmtree(tower, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "nemo_pixellm.vision_pretrain",
                            f"checkpoint={untrained / 'checkpoints'}", f"out={tower}", f"steps={tower_steps}"],
                           check=True, cwd=ROOT)
            recipe = [*recipe, f"stage1:model.vision_pretrained_path={tower}"]
        subprocess.run([sys.executable, "-m", "nemo_pixellm.pipeline", f"stages=[{','.join(STAGES)}]",
                        f"steps=[{','.join(map(str, steps))}]", f"root={root}", "eval_samples=0", *recipe],
                       check=True, cwd=ROOT)
    chain_s = time.time() - start
    final = root / "stage3" / "checkpoints"
    reports = {
        "chain, EMA weights": evaluate(final, samples, "ema=true", f"answers={root / 'heldout_answers.jsonl'}"),
        "chain, raw weights": evaluate(final, samples, "ema=false"),
        "chain, images blanked": evaluate(final, samples, "ema=true", "blind=true"),
        "untrained": evaluate(untrained / "checkpoints", samples),
    }
    answers = [json.loads(line) for line in (root / "heldout_answers.jsonl").read_text().splitlines()]
    by_axis = {axis: share_right([a for a in answers if a["type"] == "position" and a["a"] in words])
               for axis, words in (("left/right", ("left", "right")), ("top/bottom", ("top", "bottom")))}
    by_object = {kind: share_right([a for a in answers if a["type"] == "colour" and colour_object(a["q"]) == kind])
                 for kind in ("shape", "bar", "text")}
    return {"chain_s": None if evaluate_only else round(chain_s, 1), "reports": {k: v["vqa"] for k, v in reports.items()},
            "position_by_axis": by_axis, "colour_by_object": by_object}


def table_row(name: str, vqa: dict) -> str:
    asked = vqa["asked"] if "asked" in vqa else asked_accuracy(vqa)  # a mean / minimum row brings its own
    return (f"{name:30s}" + "".join(f"{vqa[t]['accuracy']:9.1%}" for t in TYPES)
            + f"{asked:9.1%}{vqa['all']['accuracy']:9.1%}")


def mean_and_min(runs: dict, arm: str, reduce) -> dict:
    """A per-type summary whose accuracies are ``reduce`` over the seeds' (asked and all included)."""
    vqas = [run["reports"][arm] for run in runs.values()]
    out = {t: {"accuracy": reduce([v[t]["accuracy"] for v in vqas]), "n": vqas[0][t]["n"]} for t in (*TYPES, "all")}
    asked = reduce([asked_accuracy(v) for v in vqas])
    return out | {"asked": asked}


def print_table(runs: dict, steps: list[int], samples: int) -> None:
    header = f"{'held-out exact match':30s}" + "".join(f"{t:>9s}" for t in TYPES) + f"{'asked':>9s}{'all':>9s}"
    any_vqa = next(iter(runs.values()))["reports"]["untrained"]
    print(header)
    print(f"{'chance':30s}" + "".join(f"{any_vqa[t]['chance']:9.1%}" for t in TYPES))
    for seed, run in runs.items():
        label = "" if seed is None else f"seed {seed}: "
        if run["chain_s"] is not None:
            print(f"{label}{sum(steps)} steps in {run['chain_s'] / 60:.1f} min of wall time (training and "
                  "checkpointing; evaluation after)")
        for arm, vqa in run["reports"].items():
            print(table_row(label + arm, vqa))
        print(f"{label}position questions (EMA) by axis: " + ", ".join(
            f"{k} {v['accuracy']:.1%} of {v['n']}" for k, v in run["position_by_axis"].items()))
        print(f"{label}colour questions (EMA) by object: " + ", ".join(
            f"{k} {v['accuracy']:.1%} of {v['n']}" for k, v in run.get("colour_by_object", {}).items()))
    if len(runs) > 1:
        for name, reduce in (("mean", lambda xs: sum(xs) / len(xs)), ("minimum", min)):
            for arm in ("chain, EMA weights", "chain, images blanked"):
                print(table_row(f"{name} {arm}", mean_and_min(runs, arm, reduce)))
    print(f"questions: {any_vqa['all']['n']} on {samples} held-out images; 'asked' = {'+'.join(ASKED)}")


def write_csv(runs: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "arm", "question_type", "n", "accuracy", "chance", "chain_minutes"])
        for seed, run in runs.items():
            minutes = "" if run["chain_s"] is None else round(run["chain_s"] / 60, 2)
            for arm, vqa in run["reports"].items():
                for t in (*TYPES, "all"):
                    writer.writerow([seed, arm, t, vqa[t]["n"], round(vqa[t]["accuracy"], 4),
                                     round(vqa[t].get("chance", float("nan")), 4), minutes])
                writer.writerow([seed, arm, "asked", "", round(asked_accuracy(vqa), 4), "", minutes])


def chain_curves(root: Path) -> tuple[list, list, list]:
    """The chain's losses [(step, loss)], held-out accuracies [(step, {type: acc})] and stage starts
    [(step, name)], on one step axis through the stages."""
    losses, accuracy, starts, offset = [], [], [], 0
    for stage in STAGES:
        run_dir = root / stage / "run"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        starts.append((offset, stage))
        losses += [(offset + r["step"], r["loss"]) for r in rows]
        if (run_dir / "vqa.jsonl").is_file():
            for line in (run_dir / "vqa.jsonl").read_text().splitlines():
                row = json.loads(line)
                accuracy.append((offset + row["step"], {t: v["accuracy"] for t, v in row["vqa"].items()}))
        offset += rows[-1]["step"]
    return losses, accuracy, starts


def smooth(values: list[float], window: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(roots: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 5))
    curves = {seed: chain_curves(root) for seed, root in roots.items()}
    for seed, (losses, _, _) in curves.items():
        ax_loss.plot([s for s, _ in losses], smooth([v for _, v in losses]), lw=1,
                     label="loss" if seed is None else f"seed {seed}")
    losses, _, starts = next(iter(curves.values()))
    # stages starting within 3% of the chain's length of each other share one label (short stages 1 and 1.5)
    labels, near = [], 0.03 * max((s for s, _ in losses), default=1)
    for step, name in starts:
        if labels and step - labels[-1][0] < near:
            labels[-1] = (step, f"{labels[-1][1]} / {name}")
        else:
            labels.append((step, name))
    for ax in (ax_loss, ax_acc):
        for step, _ in starts:
            ax.axvline(step, color="grey", lw=0.6, ls=":")
        for step, name in labels:
            ax.text(step, 0.98, f"{name} ", transform=ax.get_xaxis_transform(), va="top", ha="right", rotation=90,
                    fontsize=7, color="grey")
    ax_loss.set(xlabel="training step through the chain", ylabel="training loss (mean of 50 steps)", yscale="log",
                title="loss per stage (stage 1-2: captions and text; stage 3: answers only)")
    ax_loss.legend(loc="lower left")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, kind in zip(colours, TYPES):
        points = {}
        for _, accuracy, _ in curves.values():
            for step, row in accuracy:
                points.setdefault(step, []).append(row.get(kind, float("nan")))
        steps = sorted(points)
        mean = [sum(points[s]) / len(points[s]) for s in steps]
        ax_acc.plot(steps, mean, color=colour, marker=".", label=kind)
        if len(curves) > 1:
            ax_acc.fill_between(steps, [min(points[s]) for s in steps], [max(points[s]) for s in steps],
                                color=colour, alpha=0.15)
    band = " (mean over seeds; band: min to max)" if len(curves) > 1 else ""
    ax_acc.set(xlabel="training step through the chain", ylabel="held-out exact match", ylim=(0, 1.02),
               title=f"held-out accuracy per question type{band}")
    ax_acc.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "stage_chain")
    parser.add_argument("--steps", type=int, nargs=4, default=[50, 50, 2000, 4000])
    parser.add_argument("--samples", type=int, default=200, help="held-out images (all their questions)")
    parser.add_argument("--tower-steps", type=int, default=2000, help="the tower's pretraining (0: none)")
    parser.add_argument("--seeds", nargs="+", default=None, help="one chain per seed (rng.seed)")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the chain already under --root")
    args, overrides = parser.parse_known_args()
    if args.seeds is not None:  # "--seeds" takes every word after it: the overrides written there too
        overrides += [word for word in args.seeds if "=" in word]
        args.seeds = [int(word) for word in args.seeds if "=" not in word]
    recipe = RECIPE + overrides

    roots = {None: args.root} if args.seeds is None else {s: args.root / f"seed-{s}" for s in args.seeds}
    runs = {}
    for seed, root in roots.items():
        seeded = recipe if seed is None else [*recipe, f"rng.seed={seed}"]
        runs[seed] = run_chain(root, args.steps, args.tower_steps, args.samples, seeded, args.evaluate_only)
    print_table(runs, args.steps, args.samples)
    args.root.mkdir(parents=True, exist_ok=True)
    write_csv(runs, args.root / "stage_chain.csv")
    plot(roots, args.root / "stage_chain.png")
    print(f"wrote {args.root / 'stage_chain.csv'} and {args.root / 'stage_chain.png'}")
    print(json.dumps({"steps": args.steps, "runs": {str(k): v for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
