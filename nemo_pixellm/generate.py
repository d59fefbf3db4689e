"""Batched generation with a PixelLMModel: greedy or sampled (temperature, top-k, top-p), stopping at the
end-of-turn token. With ``use_cache`` (the default) the prompt runs once and every new token attends to
MLA's latent KV cache (a ``LatentCache`` given as the model's ``inference_context``); without it every step reruns the whole
sequence (the reference the cached path is tested against). The cache is for 1-process (TP=1) decoding.

A prompt is what ``TrainingSequences`` would build for the prompt part of a sample (segments from
``nemo_pixellm.data.samples``); generated tokens continue the M-RoPE text positions at max + 1.

Ask a trained checkpoint about your own images (the answer streams as it is decoded):

    python -m nemo_pixellm.generate checkpoint=<checkpoint.save dir> image=photo.jpg prompt="What colour is the car?"
        [image=[a.png,b.jpg] (several; <image> in the prompt places them)] [max_new_tokens=64] [temperature=0.7]
        [top_k=] [top_p=] [greedy=true] [seed=0] [ema=true] [device=cpu|cuda]
    python -m nemo_pixellm.generate checkpoint=<dir> requests=asks.jsonl [batch_size=8]
    python -m nemo_pixellm.generate checkpoint=<python -m nemo_pixellm.export's out dir> ...  # transformers
    python -m nemo_pixellm.generate checkpoint=<dir> chat=true [image=photo.jpg]  # one user turn per stdin line
        # one {"prompt": ..., "images": [paths]} per line -> one {"prompt", "images", "answer"} JSON line each

Images of any size and aspect ratio are tiled as in training (the checkpoint's view size, patch, downsample
and max_tiles; DeepSeek-VL2's rule: no tiling with 3 or more images); no image: a text-only prompt.
"""

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from nemo_pixellm import tiling
from nemo_pixellm.models.mla import LatentCache
from nemo_pixellm.prompts import Prompt, prompt_from_request, prompt_from_sample  # noqa: F401 (re-exported)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """[b, vocab] -> [b] token ids: argmax at temperature 0, else sampling from the filtered distribution."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class _Decoder:
    """Collects each row's new tokens until its end token."""

    def __init__(self, rows: int, eos_id: int, temperature: float, top_k: int, top_p: float, seed: int | list[int],
                 scores, image_id: int | None = None, on_token=None):
        self.outputs, self.done, self.scores = [[] for _ in range(rows)], [False] * rows, scores
        self.on_token = on_token
        self.eos_id, self.sampling, self.image_id = eos_id, (temperature, top_k, top_p), image_id
        # One seed: one stream for the batch. One seed per row: each row its own stream, so a row's tokens do
        # not depend on which rows it is decoded with (GRPO's rollouts on any layout).
        seeds = [seed] if isinstance(seed, int) else list(seed)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def step(self, last_logits: torch.Tensor) -> torch.Tensor:
        if self.scores is not None:
            self.scores.append(last_logits.float())
        logits = last_logits.float()
        if self.image_id is not None:  # an image placeholder has no image behind it: never emit one
            logits = logits.index_fill(1, torch.tensor([self.image_id]), float("-inf"))
        if len(self.generators) == 1:
            tokens = sample_next(logits, *self.sampling, self.generators[0])
        else:
            tokens = torch.cat([sample_next(row[None], *self.sampling, generator)
                                for row, generator in zip(logits, self.generators)])
        for i, token in enumerate(tokens.tolist()):
            if not self.done[i]:
                if token == self.eos_id:
                    self.done[i] = True
                else:
                    self.outputs[i].append(token)
                    if self.on_token is not None:
                        self.on_token(i, token)
        return tokens


@torch.no_grad()
def generate(model, prompts: list[Prompt], eos_id: int, pad_id: int, max_new_tokens: int = 8,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | list[int] = 0,
             use_cache: bool = True, scores: list | None = None, on_token=None,
             all_steps: bool = False, cache: LatentCache | None = None) -> list[list[int]]:
    """New tokens per prompt (without the end token). Right-padded batch; each row reads its own last logit.
    ``seed``: one for the batch or one per row; ``scores``: a list that receives each step's next-token
    logits [b, vocab]; ``on_token(row, token)`` is called for each new token as it is chosen (streaming);
    ``all_steps``: run max_new_tokens steps even when every row has ended (expert-parallel ranks decoding
    different prompts must run the same number of forward passes); ``cache``: a LatentCache holding earlier
    tokens of one conversation (one prompt, every slot real) that the prompt continues (``Chat``)."""
    if cache is not None and (len(prompts) != 1 or not use_cache):
        raise ValueError("generate(cache=...) continues one conversation: one prompt, use_cache=True")
    decoder = _Decoder(len(prompts), eos_id, temperature, top_k, top_p, seed, scores,
                       getattr(model, "image_token_id", None), on_token)
    device = next(model.parameters()).device
    images = torch.cat([p.views for p in prompts]).to(device)
    images = images if images.shape[0] else None
    grids = torch.cat([p.grids for p in prompts]).to(device)

    def forward(tokens, positions, attention_mask=None, **kwargs) -> torch.Tensor:
        """Inputs are built on the CPU, the model may be on a GPU; logits come back to the CPU."""
        mask = None if attention_mask is None else attention_mask.to(device)
        return model(tokens.to(device), positions.to(device), attention_mask=mask, **kwargs).cpu()

    rows = torch.arange(len(prompts))
    if not use_cache:
        for _ in range(max_new_tokens):
            seqs = [p.tokens + out for p, out in zip(prompts, decoder.outputs)]
            length = max(map(len, seqs))
            tokens = torch.tensor([r + [pad_id] * (length - len(r)) for r in seqs])
            positions = torch.stack([tiling.mrope_positions(p.blocks + [tiling.TextBlock(length - len(p.tokens))],
                                                            start=p.start) for p in prompts], dim=1)  # [3, b, length]
            logits = forward(tokens, positions, images=images, image_grids=grids)
            decoder.step(logits[rows, torch.tensor([len(r) - 1 for r in seqs])])
            if all(decoder.done) and not all_steps:
                break
        return decoder.outputs

    lengths = torch.tensor([len(p.tokens) for p in prompts])
    length = int(lengths.max())
    tokens = torch.tensor([p.tokens + [pad_id] * (length - len(p.tokens)) for p in prompts])
    prompt_positions = [tiling.mrope_positions(p.blocks + [tiling.TextBlock(length - len(p.tokens) + max_new_tokens)],
                                               start=p.start) for p in prompts]
    cache = cache if cache is not None else LatentCache()
    past = cache.slots()
    real = torch.arange(length)[None] < lengths[:, None]  # [b, slots]: cache slots holding real tokens
    real = torch.cat([torch.ones(len(prompts), past, dtype=torch.bool), real], dim=1)
    causal = torch.ones(length, past + length, dtype=torch.bool).tril(diagonal=past)
    mask = ~(real[:, None, None, :] & causal)  # True = masked (Megatron)
    positions = torch.stack([ids[:, :length] for ids in prompt_positions], dim=1)
    logits = forward(tokens, positions, attention_mask=mask, images=images, image_grids=grids, inference_context=cache)
    next_tokens = decoder.step(logits[rows, lengths - 1])
    # The k-th new token of row i sits at text position (prompt end + k - 1) of that row: every step's, at once.
    new_positions = torch.stack([ids[:, int(n): int(n) + max_new_tokens] for ids, n in zip(prompt_positions, lengths)],
                                dim=1)  # [3, b, max_new_tokens]
    masked = torch.cat([~real, torch.zeros(len(prompts), max_new_tokens, dtype=torch.bool)], dim=1)[:, None, None]
    for k in range(1, max_new_tokens):
        if all(decoder.done) and not all_steps:
            break
        logits = forward(next_tokens[:, None], new_positions[:, :, k - 1: k],
                         attention_mask=masked[..., : real.shape[1] + k], inference_context=cache)
        next_tokens = decoder.step(logits[:, -1])
    return decoder.outputs


class Chat:
    """One conversation with a model (1 process): each turn is laid out as training lays out multi-turn chats
    (``<|user|> .. <|assistant|> answer <|end|> <|user|> ..``, M-RoPE ids continuing), and the cache keeps every
    earlier token, so a turn runs only its own tokens through the model. This one decodes with the Megatron
    model and MLA's latent cache; ``ExportedChat`` with an export's transformers model and its KV cache."""

    def __init__(self, model, tokenizer, layout, context: int, **sampling):
        self.model, self.tokenizer, self.layout, self.context, self.sampling = model, tokenizer, layout, context, sampling
        self.cache, self.tokens, self.end = LatentCache(), [], 0  # conversation so far; its next position

    def cached(self) -> int:
        """How many of the conversation's tokens the cache holds (the last answer's end is not among them)."""
        return self.cache.slots()

    def ask(self, text: str, images=(), on_token=None) -> list[int]:
        turn = prompt_from_request(self.tokenizer, text, list(images), self.layout)
        pending = self.tokens[self.cached():]  # the last answer's end, not yet through the model
        new_end = int(tiling.mrope_positions(turn.blocks, start=self.end).max()) + 1
        needed = len(self.tokens) + len(turn.tokens) + self.sampling.get("max_new_tokens", 8)
        if needed > self.context:
            raise RequestError(f"the conversation needs {needed} positions with this turn and its answer, more than "
                               f"the model's context of {self.context} (seq_length): start a new chat")
        prompt = Prompt(pending + turn.tokens, [tiling.TextBlock(len(pending))] + turn.blocks, turn.views, turn.grids,
                        start=self.end - len(pending))
        answer = self.decode(prompt, on_token)
        self.tokens += turn.tokens + answer + [self.tokenizer.eos_id]
        self.end = new_end + len(answer) + 1
        return answer

    def decode(self, prompt: Prompt, on_token) -> list[int]:
        """The answer to ``prompt`` (the uncached tokens), continuing the cache."""
        return generate(self.model, [prompt], self.tokenizer.eos_id, self.tokenizer.pad_id, cache=self.cache,
                        on_token=on_token, **self.sampling)[0]


class ExportedChat(Chat):
    """A Chat with an export directory's transformers model (``nemo_pixellm.hf``): transformers' generate
    continues its returned ``past_key_values`` from the whole conversation's ids and M-RoPE ids."""

    def __init__(self, model, processor, context: int, max_new_tokens: int = 8, seed: int = 0, **sampling):
        super().__init__(model, processor.tokenizer, processor.layout, context, max_new_tokens=max_new_tokens)
        self.processor, self.generate_kwargs, self.seed = processor, sampling, seed
        device = model.device
        self.past = None
        self.ids = torch.zeros(1, 0, dtype=torch.long, device=device)  # what the cache holds, and more
        self.positions = torch.zeros(3, 1, 0, dtype=torch.long, device=device)

    def cached(self) -> int:
        return 0 if self.past is None else self.past.get_seq_length()

    def decode(self, prompt: Prompt, on_token) -> list[int]:
        from nemo_pixellm.hf.pixellm import TokenStreamer, answer_tokens

        inputs = self.processor.batch([prompt]).to(self.model.device)
        cached = self.cached()
        ids = torch.cat([self.ids[:, :cached], inputs["input_ids"]], dim=1)
        positions = torch.cat([self.positions[..., :cached], inputs["position_ids"]], dim=-1)
        eos = self.tokenizer.eos_id
        torch.manual_seed(self.seed)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                pixel_values=inputs["pixel_values"], image_grids=inputs["image_grids"], past_key_values=self.past,
                max_new_tokens=self.sampling["max_new_tokens"], return_dict_in_generate=True,
                streamer=TokenStreamer(on_token, eos) if on_token else None, **self.generate_kwargs)
        self.past, self.ids = output.past_key_values, output.sequences
        new = output.sequences[0, ids.shape[1]:].tolist()
        answer = answer_tokens(new, eos)
        # the answer's ids continue the prompt's text positions (the end token's too, once it is fed)
        start = int(positions.max()) + 1
        new_positions = torch.arange(start, start + len(new), device=positions.device).expand(3, 1, -1)
        self.positions = torch.cat([positions, new_positions], dim=-1)
        return answer


# --------------------------------------------------------------------------------------------------- CLI
@dataclass
class GenerateArgs:
    checkpoint: str = "???"
    prompt: str = ""
    image: Any = None  # image=a.jpg or image=[a.jpg,b.png]
    requests: str | None = None  # a JSONL file: {"prompt": ..., "images": [...]} per line
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False  # argmax whatever the temperature
    seed: int = 0
    batch_size: int = 8
    chat: bool = False  # a conversation: one user turn per stdin line (image= goes with the first), cache kept
    ema: bool = True  # the checkpoint's EMA weights when it has them
    device: str = "cpu"


class RequestError(ValueError):
    pass


def open_request_image(path: str) -> Image.Image:
    file = Path(path)
    if not file.is_file():
        raise RequestError(f"image {path}: no such file")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")  # decodes it all now: a truncated or corrupt file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RequestError(f"image {path}: not an image the decoder can read ({error})") from None


def read_requests(args: GenerateArgs) -> list[dict]:
    """[{"prompt", "images": [paths], "pictures": [PIL images]}], every image opened before any model loads."""
    if args.requests:
        path = Path(args.requests)
        if not path.is_file():
            raise RequestError(f"requests={args.requests}: no such file")
        requests = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                requests.append({"prompt": str(row["prompt"]), "images": [str(p) for p in row.get("images", [])]})
            except (ValueError, KeyError, TypeError) as error:
                raise RequestError(f"requests={args.requests} line {number}: want {{\"prompt\": ..., \"images\": "
                                   f"[...]}} ({type(error).__name__}: {error})") from None
    else:
        images = [] if args.image is None else [args.image] if isinstance(args.image, str) else list(args.image)
        requests = [{"prompt": args.prompt, "images": images}]
    for request in requests:
        if not request["prompt"] and not request["images"]:
            raise RequestError("give prompt=\"...\" (and image=<file> to ask about a picture)")
        request["pictures"] = [open_request_image(p) for p in request["images"]]
    return requests


def check_context(request: dict, prompt: Prompt, image_id: int, max_new_tokens: int, context: int) -> None:
    """Refuse a request whose prompt and answer do not fit the model's context (its seq_length)."""
    image_tokens = prompt.tokens.count(image_id)
    if image_tokens > context:
        raise RequestError(f"images {request['images']} need {image_tokens} positions, more than the model's context "
                           f"of {context} (seq_length): give fewer or smaller images")
    if len(prompt.tokens) + max_new_tokens > context:
        raise RequestError(f"prompt {request['prompt'][:40]!r}: {len(prompt.tokens)} positions ({image_tokens} for "
                           f"images) + max_new_tokens={max_new_tokens} exceed the model's context of {context} "
                           "(seq_length): shorten the prompt or lower max_new_tokens")


def run(args: GenerateArgs, out=None, turns=None) -> list[str]:
    """``checkpoint``: a training checkpoint (the Megatron model) or an export directory (transformers).
    ``out``: where answers go (default: sys.stdout at the call); ``turns``: the chat's user turns (default:
    stdin's lines)."""
    out = out or sys.stdout  # looked up now: a default bound at import would miss a redirected stdout
    if args.chat:
        return run_chat(args, out, sys.stdin if turns is None else turns)
    requests = read_requests(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError(f"device={args.device}: no CUDA device here; use device=cpu")
    temperature = 0.0 if args.greedy else args.temperature
    if (Path(args.checkpoint) / "pixellm.json").is_file():
        answer, tokenizer, layout, context = _exported_model(args, temperature)
    else:
        answer, tokenizer, layout, context = _trained_model(args, temperature)
    prompts = []
    for request in requests:
        try:
            prompts.append(prompt_from_request(tokenizer, request["prompt"], request["pictures"], layout))
        except ValueError as error:  # placeholders vs images
            raise RequestError(f"prompt {request['prompt']!r}: {error}") from None
        check_context(request, prompts[-1], tokenizer.image_id, args.max_new_tokens, context)
    answers, decoded, began = [], 0, time.perf_counter()
    if not args.requests:  # one request: stream the answer as it is decoded
        stream = TextStream(tokenizer, out)
        answer(prompts, on_token=stream.on_token)
        answers, decoded = [stream.finish()], len(stream.said)
    else:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            for offset, tokens in enumerate(answer(batch)):
                request = requests[start + offset]
                answers.append(tokenizer.decode(tokens).strip())
                decoded += len(tokens)
                out.write(json.dumps({"prompt": request["prompt"], "images": request["images"],
                                      "answer": answers[-1]}) + "\n")
                out.flush()
    seconds = time.perf_counter() - began
    print(f"[generate] {decoded} new tokens for {len(prompts)} prompt(s) in {seconds:.2f} s: "
          f"{decoded / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr, flush=True)
    return answers


class TextStream:
    """Writes an answer to ``out`` as its tokens arrive (``on_token``); ``finish`` ends the line."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.said, self.shown = tokenizer, out, [], ""

    def on_token(self, row: int, token: int) -> None:
        self.said.append(token)
        self._show(final=False)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.said).lstrip()
        if not final and text.endswith("\ufffd"):
            return  # a character's bytes are still arriving: wait for the rest
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self) -> str:
        self._show(final=True)
        self.out.write("\n")
        return self.shown.strip()


def run_chat(args: GenerateArgs, out, turns) -> list[str]:
    """chat=true: answer each turn as it comes, streamed, keeping the conversation and its cache."""
    files = [] if args.image is None else [args.image] if isinstance(args.image, str) else list(args.image)
    pictures = [open_request_image(path) for path in files]  # with the first turn
    temperature = 0.0 if args.greedy else args.temperature
    if (Path(args.checkpoint) / "pixellm.json").is_file():
        model, processor, sampling = _load_exported(args, temperature)
        chat = ExportedChat(model, processor, model.config.text_config.max_position_embeddings,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling)
    else:
        model, tokenizer, data_config = _load_trained(args)
        chat = Chat(model, tokenizer, data_config, model.config.seq_length, max_new_tokens=args.max_new_tokens,
                    temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    answers = []
    for line in turns:
        if not line.strip():
            break
        stream = TextStream(chat.tokenizer, out)
        chat.ask(line.strip(), pictures if not answers else [], on_token=stream.on_token)
        answers.append(stream.finish())
    return answers


def _load_trained(args: GenerateArgs):
    """(model on args.device, tokenizer, data config) of a training checkpoint."""
    from nemo_pixellm.data import sources
    from nemo_pixellm.evaluate import load
    from nemo_pixellm.training.ema import load_ema_into

    with contextlib.redirect_stdout(sys.stderr):  # Bridge's loader prints; stdout carries only the answers
        model, data_config, directory = load(args.checkpoint)
        if args.ema:
            load_ema_into(model, directory)
    return model.to(args.device), sources.load_tokenizer(data_config), data_config


def _trained_model(args: GenerateArgs, temperature: float):
    """(answer(prompts, on_token=None) -> new tokens per prompt, tokenizer, data layout, context) of a training
    checkpoint."""
    model, tokenizer, data_config = _load_trained(args)

    def answer(prompts, on_token=None):
        return generate(model, prompts, tokenizer.eos_id, tokenizer.pad_id, max_new_tokens=args.max_new_tokens,
                        temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        on_token=on_token)
    return answer, tokenizer, data_config, model.config.seq_length


def _load_exported(args: GenerateArgs, temperature: float):
    """(transformers model on args.device, processor, generate()'s sampling arguments) of an export directory."""
    from nemo_pixellm.hf.pixellm import PixelLMForConditionalGeneration, PixelLMProcessor

    model = PixelLMForConditionalGeneration.from_pretrained(args.checkpoint).to(args.device)
    sampling = dict(do_sample=temperature > 0)
    if temperature > 0:
        sampling |= dict(temperature=temperature, top_k=args.top_k or None, top_p=args.top_p)
    return model, PixelLMProcessor.from_pretrained(args.checkpoint), sampling


def _exported_model(args: GenerateArgs, temperature: float):
    """The same for an export directory, through transformers (nemo_pixellm.hf; sampling draws from torch's
    global generator seeded with ``seed``, so sampled answers differ from the Megatron model's)."""
    from nemo_pixellm.hf.pixellm import TokenStreamer, answer_tokens

    model, processor, sampling = _load_exported(args, temperature)
    tokenizer = processor.tokenizer

    def answer(prompts, on_token=None):
        inputs = processor.batch(prompts).to(args.device)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling,
                                    streamer=TokenStreamer(on_token, tokenizer.eos_id) if on_token else None)
        rows = output[:, inputs["input_ids"].shape[1]:].tolist()
        return [answer_tokens(row, tokenizer.eos_id) for row in rows]
    return answer, tokenizer, processor.layout, model.config.text_config.max_position_embeddings


def main(argv=None) -> None:
    from nemo_pixellm import compat

    compat.enable(entry_point=True)
    from nemo_pixellm.evaluate import parse_args

    args = parse_args(GenerateArgs, sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (RequestError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
