"""Where the answer looks: each LM layer's attention from the position that predicts the answer, on held-out
synthetic scene questions (colour and position), split into the asked object's image cells, the other image
cells, and the question's words.

    .venv/bin/python benchmarks/answer_attention.py CHECKPOINT [--questions 50] [--show 2]

CHECKPOINT is a checkpoint.save directory trained on the synthetic set at 112-pixel views (one token per cell of
the scenes' 4x4 grid). The asked object's cells are found in the image (pixels of the named colour). Printed per
question type: accuracy, and per layer and head the mean attention on the object's cells and on all image
cells; then --show examples per type with each head's three most-attended question words. Issue 20's reading: a
head that answers "what colour is the circle?" puts ~90% of its attention on the circle's cells; for "is the
red circle on the left or the right?" the first layer fetched "or" instead of the object's name, and the
second layer never looked at the object.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from nemo_pixellm import compat

compat.enable(quiet=True)

import nemo_pixellm.models.core_attention as core_attention  # noqa: E402
from nemo_pixellm.data import sources  # noqa: E402
from nemo_pixellm.data.samples import ShardSamples  # noqa: E402
from nemo_pixellm.data.synthetic import COLOURS, render_scene  # noqa: E402
from nemo_pixellm.evaluate import load, question_jobs  # noqa: E402
from nemo_pixellm.generate import generate  # noqa: E402
from nemo_pixellm.prompts import prompt_from_sample  # noqa: E402

GRID, VIEW = 4, 112
TYPES = ("colour", "position")


class LastQueryAttention:
    """Wraps the local backend's SDPA call: also keeps the softmax weights of the last query row ([heads, keys])."""

    def __init__(self):
        self.sdpa = core_attention.F.scaled_dot_product_attention
        self.weights = []

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, scale=None, enable_gqa=False):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        logits = (q[0, :, -1:].float() @ k[0].float().transpose(-1, -2)) * scale  # one sequence, last query
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask[0, :, -1:].bool(), float("-inf"))
        self.weights.append(logits.softmax(-1)[:, 0])
        return self.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                         enable_gqa=enable_gqa)


def object_cells(meta: dict, qa: dict) -> torch.Tensor | None:
    """[GRID, GRID] cells holding the asked object: the named colour (position) or the named shape's colour."""
    if qa["type"] == "position":
        colour = re.search(r"the (\w+) (circle|square|triangle)", qa["q"]).group(1)
    else:
        shape = re.search(r"the (circle|square|triangle)", qa["q"])
        if shape is None:
            return None
        groups = re.findall(r"(\w+) (\w+) (circle|square|triangle)", meta["caption"])
        colour = next(c for _, c, s in groups if s == shape.group(1))
    image = render_scene(meta["seed"], meta["index"], VIEW).image.convert("RGB")
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float).view(VIEW, VIEW, 3)
    match = (pixels - torch.tensor(COLOURS[colour], dtype=torch.float)).abs().sum(-1) < 60
    cell = VIEW // GRID
    return match.view(GRID, cell, GRID, cell).sum((1, 3)) > cell * cell // 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--questions", type=int, default=50, help="per question type")
    parser.add_argument("--show", type=int, default=2, help="examples per type with their most-attended words")
    args = parser.parse_args()

    model, data_config, _ = load(str(args.checkpoint))
    if data_config.image_size != VIEW:
        sys.exit(f"the checkpoint's views are {data_config.image_size} pixels: this reads {VIEW}-pixel views")
    tokenizer = sources.load_tokenizer(data_config)
    questions = ShardSamples(sources.data_paths(data_config)[1], tokenizer, "vqa", data_config.patch_size,
                             data_config.downsample, data_config.max_tiles)
    recorder = LastQueryAttention()
    core_attention.F.scaled_dot_product_attention = recorder
    short_causal, core_attention.SHORT_CAUSAL = core_attention.SHORT_CAUSAL, 0  # every call through SDPA: recorded
    layers = model.language_model.config.num_layers
    rows = {t: [] for t in TYPES}
    for record, index, qa in question_jobs(questions, len(questions)):
        meta = json.loads(questions.reader[record]["json"])
        if qa["type"] not in rows or len(rows[qa["type"]]) >= args.questions or meta["kind"] != "scene":
            continue
        cells = object_cells(meta, qa)
        if cells is None:
            continue
        prompt = prompt_from_sample(questions.sample(index, data_config.image_size, data_config.seq_length))
        tokens = torch.as_tensor(prompt.tokens)
        recorder.weights.clear()
        answer = generate(model, [prompt], tokenizer.eos_id, tokenizer.pad_id, 1, use_cache=False)[0]
        if len(recorder.weights) != model.vision_model.config.num_layers + layers:
            raise SystemExit(f"recorded {len(recorder.weights)} attention calls, not the tower's and the LM's layers: "
                             "an attention path that bypasses scaled_dot_product_attention")
        first = int((tokens == tokenizer.image_id).nonzero()[0])
        grid = torch.arange(first, first + GRID * (GRID + 1)).view(GRID, GRID + 1)[:, :GRID]  # newline closes rows
        text = torch.arange(first + GRID * (GRID + 1), len(tokens))
        heads = []
        for weights in recorder.weights[-layers:]:  # the LM's layers come after the tower's
            image = weights[:, grid]  # [heads, GRID, GRID]
            top = weights[:, text].topk(3, dim=-1)
            heads.append({"object": (image * cells).sum((1, 2)).tolist(), "image": image.sum((1, 2)).tolist(),
                          "words": [[(tokenizer.decode([int(tokens[text[i]])]), round(v, 2)) for v, i in zip(vs, ix)]
                                    for vs, ix in zip(top.values.tolist(), top.indices.tolist())]})
        said = tokenizer.decode(answer).strip()
        rows[qa["type"]].append({"q": qa["q"], "a": qa["a"], "said": said, "right": said == qa["a"], "layers": heads})
    core_attention.F.scaled_dot_product_attention = recorder.sdpa
    core_attention.SHORT_CAUSAL = short_causal

    for kind, found in rows.items():
        print(f"\n{kind}: {len(found)} questions, {sum(r['right'] for r in found) / max(len(found), 1):.0%} right")
        for layer in range(layers):
            on_object = torch.tensor([r["layers"][layer]["object"] for r in found]).mean(0)
            on_image = torch.tensor([r["layers"][layer]["image"] for r in found]).mean(0)
            print(f"  layer {layer + 1}, per head: attention on the object's cells "
                  f"{' '.join(f'{x:.2f}' for x in on_object)}; on all image cells {' '.join(f'{x:.2f}' for x in on_image)}")
        for example in found[:args.show]:
            print(f"  {example['q']} -> {example['said']!r} (answer {example['a']!r})")
            for layer, heads in enumerate(example["layers"]):
                for head, words in enumerate(heads["words"]):
                    print(f"    layer {layer + 1} head {head}: object {heads['object'][head]:.2f}, image "
                          f"{heads['image'][head]:.2f}, words " + ", ".join(f"{w!r} {v}" for w, v in words))


if __name__ == "__main__":
    main()
