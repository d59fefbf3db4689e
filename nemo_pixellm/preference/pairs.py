"""DPO pairs from a trained model's own mistakes: for the questions of a VQA shard set (the synthetic stage-4
split by default, images no earlier stage trained on), chosen = the known answer, rejected = the answer the model
gives when it is wrong, else a wrong answer of the same type (``synthetic.distractor``). Written as
``data_prep.preference`` records, so stage 4 DPO reads them with ``dataset.path``:

    python -m nemo_pixellm.preference.pairs checkpoint=<stage-3 checkpoint.save> out=<dir> [samples=2000]
        [data=<VQA shards>] [batch_size=16] [max_new_tokens=6] [temperature=0] [answers=1] [seed=0] [ema=false]
    python -m nemo_pixellm.train +stage=stage4 stage.algorithm=dpo stage.init_from=<same checkpoint> dataset.path=<dir>

The model's answers are decoded once, here (greedy by default), so DPO's data stays a pure function of the
index (exact resume on any layout, as for every other stage). With ``answers=K`` (and a temperature) the model
answers each question K times and the rejected answer is its most frequent wrong one: a model right 85% of the
time gives wrong answers to few questions when asked once. Each record keeps the question's type and
``rejected_from`` ("model" or "distractor"); the summary line counts both.
"""

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PairArgs:
    checkpoint: str = "???"
    out: str = "???"
    samples: int = 2000  # records (images) to ask; every question of each
    data: str | None = None  # VQA shards (default: the checkpoint's stage-4 split, sources.stage4_path)
    batch_size: int = 16
    max_new_tokens: int = 6
    temperature: float = 0.0
    answers: int = 1  # sampled answers per question (needs temperature > 0 when > 1)
    seed: int = 0
    ema: bool = False  # the stage-3 weights DPO starts from (stage.init_from loads the raw ones)
    shard_size: int = 1000


def rejected_answer(said: list[str], qa: dict, rng: random.Random) -> tuple[str, str]:
    """(rejected answer, where it comes from): the model's most frequent wrong answer among those it gave (the
    first one on ties), else a distractor."""
    from nemo_pixellm.data.synthetic import distractor
    from nemo_pixellm.vqa_score import vqa_score

    wrong = [a.strip() for a in said if a.strip() and vqa_score(a, qa.get("answers") or [qa["a"]]) == 0.0]
    if wrong:
        return max(wrong, key=wrong.count), "model"  # max keeps the first of equal counts
    return distractor(qa, rng), "distractor"


def build_pairs(args: PairArgs) -> dict:
    from nemo_pixellm.data import sources
    from nemo_pixellm.data.samples import ShardSamples, image_members
    from nemo_pixellm.data.shards import write_shards
    from nemo_pixellm.evaluate import load, question_jobs
    from nemo_pixellm.generate import generate, prompt_from_sample
    from nemo_pixellm.training.ema import load_ema_into

    out = Path(args.out)
    if args.answers < 1 or (args.answers > 1 and args.temperature <= 0):
        raise ValueError(f"answers={args.answers} with temperature={args.temperature}: give answers >= 1, and a "
                         "temperature > 0 for more than one (greedy answers repeat)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} is not empty: give a new directory (nothing there was changed)")
    model, data_config, directory = load(args.checkpoint)
    if args.ema:
        load_ema_into(model, directory)
    tokenizer = sources.load_tokenizer(data_config)
    shards = args.data or sources.stage4_path(data_config)
    questions = ShardSamples(shards, tokenizer, "vqa", data_config.patch_size, data_config.downsample,
                             data_config.max_tiles, key="data" if args.data else "dataset.path")
    jobs = question_jobs(questions, args.samples)
    began, records, counts = time.perf_counter(), [], {"model": 0, "distractor": 0}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        asked = [prompt_from_sample(questions.sample(index, data_config.image_size, data_config.seq_length))
                 for _, index, _ in batch]
        prompts = [prompt for prompt in asked for _ in range(args.answers)]  # each built once, asked K times
        seeds = [args.seed * 1_000_003 + (start + i) * args.answers + k for i in range(len(batch))
                 for k in range(args.answers)]  # answers=1: the seeds of one answer per question, as before
        answers = generate(model, prompts, tokenizer.eos_id, tokenizer.pad_id, args.max_new_tokens,
                           args.temperature, seed=seeds)
        for i, (record, index, qa) in enumerate(batch):
            rng = random.Random(f"pixellm-pairs-{args.seed}-{index}")
            said = [tokenizer.decode(a) for a in answers[i * args.answers:(i + 1) * args.answers]]
            rejected, source = rejected_answer(said, qa, rng)
            counts[source] += 1
            raw = questions.reader[record]
            images = {m: raw[m] for m in image_members(raw)}
            meta = {"question": qa["q"], "chosen": qa["a"], "rejected": rejected, "rejected_from": source,
                    "type": qa.get("type", "vqa"), "record": raw["__key__"]}
            records.append({"__key__": f"{len(records):09d}", **images, "json": json.dumps(meta).encode()})
    manifest = write_shards(records, out, args.shard_size)
    return {"out": str(out), "pairs": len(records), "rejected_from_model": counts["model"],
            "rejected_from_distractor": counts["distractor"], "seconds": round(time.perf_counter() - began, 1),
            "sha256": manifest["sha256"]}


def main(argv=None) -> None:
    from nemo_pixellm import compat

    compat.enable(entry_point=True)
    from nemo_pixellm.evaluate import parse_args

    args = parse_args(PairArgs, sys.argv[1:] if argv is None else argv, required=("checkpoint", "out"))
    try:
        print(json.dumps(build_pairs(args)))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
