"""Held-out evaluation of a checkpoint: VQA accuracy per question type, caption loss/perplexity.

    python -m nemo_pixellm.evaluate checkpoint=<checkpoint.save dir> [samples=200] [blind=true] [ema=false]
        [answers=<file>: every question, the answer given and its score, as JSON lines]
        [data=<shards of data_prep.vqa>] [max_new_tokens=6]

The model and its data config come from the checkpoint (Bridge's loader and run config); questions come
from the held-out split the training never saw, or from ``data`` (real VQA shards; no caption loss then).
Each answer scores the official VQA accuracy against the question's reference answers (``vqa_score``: exact
match for one or two, min(1, annotators agreeing / 3) for VQAv2's ten). ``blind=true`` replaces every image with a
blank (mean colour) one: the text-only baseline. ``chance`` is the accuracy of always giving the most
frequent answer of each question type. Greedy decoding unless ``temperature`` > 0 (then ``top_k`` /
``top_p`` apply).
"""

import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_pixellm import compat

compat.enable(entry_point=True)  # version check and CPU layer, before Megatron loads

from nemo_pixellm.data import sources  # noqa: E402
from nemo_pixellm.training.checkpoints import iteration_dir  # noqa: E402
from nemo_pixellm.vqa_score import normalize_answer, vqa_score  # noqa: E402


@dataclass
class EvalArgs:
    checkpoint: str = "???"
    samples: int = 200  # held-out images; every question of each is asked
    blind: bool = False
    ema: bool = True  # use the EMA weights when the checkpoint has them
    batch_size: int = 16
    max_new_tokens: int = 6
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    use_cache: bool = True  # MLA latent KV cache (1 process); false reruns the sequence per token
    data: str | None = None  # VQA shards to ask instead of the checkpoint's held-out split
    answers: str | None = None  # a file to write every question, answer and score to (JSON lines)


def saved_data_config(directory):
    """The PixelLMDataConfig a checkpoint (an iteration directory) was trained with: its run config's dataset."""
    from megatron.bridge.training.checkpointing import get_checkpoint_run_config_filename, read_run_config
    from megatron.bridge.utils.instantiate_utils import instantiate

    import nemo_pixellm.models.provider  # noqa: F401  (lets Bridge instantiate nemo_pixellm classes)

    return instantiate(read_run_config(get_checkpoint_run_config_filename(str(directory)))["dataset"])


def load(checkpoint: str):
    """(model in eval mode, its PixelLMDataConfig) from a Bridge checkpoint written by nemo_pixellm.train."""
    from megatron.bridge.training.model_load_save import load_megatron_model

    import nemo_pixellm.models.provider  # noqa: F401  (lets Bridge instantiate the provider)

    from nemo_pixellm.distributed import single_process_groups

    directory = iteration_dir(checkpoint)
    single_process_groups()  # the model keeps these groups (Bridge's temporary context would tear its own down)
    model = load_megatron_model(str(directory), use_cpu_init=True, skip_temp_dist_context=True)
    model = (model[0] if isinstance(model, list) else model).eval()
    return model, saved_data_config(directory), directory


class NoQuestions(ValueError):
    pass


def question_jobs(questions, samples: int, where: str = "the shards") -> list[tuple[int, int, dict]]:
    """(record, sample index, qa) for every question of the first ``samples`` records of a vqa ShardSamples
    (its sample ``q * len + record`` asks question q of the record)."""
    jobs = []
    for record in range(min(samples, len(questions))):
        fields = json.loads(questions.reader[record]["json"])
        if "qa" not in fields:  # e.g. a DPO run's held-out split: preference pairs, no questions
            raise NoQuestions(f"{where}: record {record} has no \"qa\" questions (its keys: {sorted(fields)[:6]}); "
                              "give data=<VQA shards> (the synthetic held-out split, or data_prep.vqa output)")
        for number, qa in enumerate(fields["qa"]):
            jobs.append((record, number * len(questions) + record, qa))
    return jobs


def ask_questions(model, data_config, tokenizer, args: EvalArgs) -> list[dict]:
    from nemo_pixellm.data.samples import ShardSamples
    from nemo_pixellm.generate import generate, prompt_from_sample

    heldout = args.data or sources.data_paths(data_config)[1]
    questions = ShardSamples(heldout, tokenizer, "vqa", data_config.patch_size, data_config.downsample,
                             data_config.max_tiles, key="data" if args.data else "dataset.path")
    where = f"data={heldout}" if args.data else f"the checkpoint's held-out data {heldout}"
    jobs = question_jobs(questions, args.samples, where)
    results = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        prompts = []
        for _, index, _ in batch:
            prompt = prompt_from_sample(questions.sample(index, data_config.image_size, data_config.seq_length))
            if args.blind:
                prompt.views = torch.zeros_like(prompt.views)  # mean colour after normalisation
            prompts.append(prompt)
        answers = generate(model, prompts, tokenizer.eos_id, tokenizer.pad_id, args.max_new_tokens,
                           args.temperature, args.top_k, args.top_p, use_cache=args.use_cache)
        for (_, _, qa), answer in zip(batch, answers):
            said = tokenizer.decode(answer).strip()
            answers = qa.get("answers") or [qa["a"]]
            results.append({"type": qa["type"], "q": qa["q"], "a": qa["a"], "answers": answers, "said": said,
                            "score": vqa_score(said, answers)})
    return results


def caption_loss(model, data_config, tokenizer, args: EvalArgs) -> float:
    from nemo_pixellm.data.dataset import TrainingSequences
    from nemo_pixellm.data.samples import ShardSamples

    _, heldout = sources.data_paths(data_config)
    captions = TrainingSequences([ShardSamples(heldout, tokenizer, "caption", data_config.patch_size,
                                               data_config.downsample, data_config.max_tiles)], [1.0], tokenizer,
                                 data_config.seq_length, min(args.samples, 200), data_config.image_size)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(captions), args.batch_size):
            batch = captions.collate_fn([captions[i] for i in range(start, min(start + args.batch_size, len(captions)))])
            images = torch.zeros(batch["images"].shape) if args.blind else batch["images"]  # mean colour (normalised)
            loss = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], images=images,
                         image_grids=batch["image_grids"])
            total += float((loss * batch["loss_mask"]).sum())
            count += float(batch["loss_mask"].sum())
    return total / max(count, 1.0)


def summarize(results: list[dict]) -> dict:
    by_type = defaultdict(list)
    for r in results:
        by_type[r["type"]].append(r)
    summary = {}
    for kind, rows in sorted(by_type.items()):
        most_common = Counter(normalize_answer(r["a"]) for r in rows).most_common(1)[0][0]
        summary[kind] = {"n": len(rows), "accuracy": sum(r["score"] for r in rows) / len(rows),
                         "chance": sum(vqa_score(most_common, r["answers"]) for r in rows) / len(rows)}
    summary["all"] = {"n": len(results), "accuracy": sum(r["score"] for r in results) / max(len(results), 1)}
    return summary


def evaluate(args: EvalArgs) -> dict:
    from nemo_pixellm.training.ema import load_ema_into

    model, data_config, directory = load(args.checkpoint)
    ema_used = load_ema_into(model, directory) if args.ema else False
    tokenizer = sources.load_tokenizer(data_config)
    results = ask_questions(model, data_config, tokenizer, args)
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(r) + "\n" for r in results))
    report = {"checkpoint": str(directory), "data": args.data, "blind": args.blind, "ema": ema_used,
              "vqa": summarize(results)}
    if args.data is None:  # real VQA shards have no captions
        loss = caption_loss(model, data_config, tokenizer, args)
        report.update(caption_loss=loss, caption_perplexity=math.exp(min(loss, 50.0)))
    return report


def parse_args(schema, argv, required=("checkpoint",)):
    """``key=value`` arguments into the dataclass ``schema``; exits naming a bad key or value, or a missing one."""
    try:
        args = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
    except Exception as err:  # omegaconf names the bad key or value
        sys.exit(f"error: {err}")
    missing = [k for k in required if OmegaConf.is_missing(args, k)]
    if missing:
        sys.exit(f"error: give {' and '.join(f'{k}=<dir>' for k in missing)}")
    return OmegaConf.to_object(args)


def main(argv=None) -> None:
    try:
        report = evaluate(parse_args(EvalArgs, sys.argv[1:] if argv is None else argv))
    except NoQuestions as error:
        sys.exit(f"error: {error}")
    print(json.dumps(report))
    print(f"{'type':10s} {'n':>5s} {'accuracy':>9s} {'chance':>7s}")
    for kind, row in report["vqa"].items():
        print(f"{kind:10s} {row['n']:5d} {row['accuracy']:9.1%} {row.get('chance', float('nan')):7.1%}")
    if "caption_loss" in report:
        print(f"caption loss {report['caption_loss']:.4f} (perplexity {report['caption_perplexity']:.2f})")


if __name__ == "__main__":
    main()
