"""The whole PixelLM VLM in Hugging Face transformers, loaded from ``python -m nemo_pixellm.export``'s directory:

    from nemo_pixellm.hf import PixelLMForConditionalGeneration, PixelLMProcessor
    model = PixelLMForConditionalGeneration.from_pretrained("exported/")
    processor = PixelLMProcessor.from_pretrained("exported/")
    inputs = processor("What colour is the car?", images=[Image.open("car.jpg")])
    print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:]))

transformers' own classes do the work: ``SiglipVisionModel`` (the tower), the language model's class
(``DeepseekV3ForCausalLM``, or ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` for grouped-query attention; its rotary
module extended to M-RoPE ids) and ``GenerationMixin`` (decoding with the KV cache);
the joining code here is the projector (pixel-unshuffle MLP and the view layout of ``nemo_pixellm.tiling``),
the image features scattered into the image-token positions, and the processor, which lays a request out
exactly as training did (``nemo_pixellm.prompts``: tiling, placeholders, chat template, M-RoPE ids).
Nothing here imports Megatron.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForCausalLM, BatchFeature, GenerationConfig,
                          GenerationMixin, PretrainedConfig, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel)

from nemo_pixellm import tiling
from nemo_pixellm.data.tokenizer import PixelTokenizer
from nemo_pixellm.prompts import Prompt, prompt_from_request

EXPORT_FILES = ("pixellm.json", "language_model/config.json", "vision_tower/config.json", "projector.safetensors")


def _check_export(directory: Path) -> None:
    missing = [name for name in EXPORT_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a PixelLM export (missing {', '.join(missing)}): write one with "
                                "python -m nemo_pixellm.export checkpoint=<checkpoint.save dir> out=<dir>")


class PixelLMConfig(PretrainedConfig):
    model_type = "pixellm"
    sub_configs = {"text_config": AutoConfig, "vision_config": SiglipVisionConfig}

    def __init__(self, text_config=None, vision_config=None, image_token_id: int = 0, patch_size: int = 14,
                 downsample: int = 2, mrope_section: list[int] | None = None, projector_ffn_hidden_size: int = 0,
                 image_size: int = tiling.TILE, max_tiles: int = 0, image_position_code: bool = False,
                 mrope_interleaved: bool = False, **kwargs):
        self.image_token_id, self.patch_size, self.downsample = image_token_id, patch_size, downsample
        self.image_position_code = image_position_code
        self.mrope_section, self.mrope_interleaved = list(mrope_section or []), mrope_interleaved
        self.projector_ffn_hidden_size = projector_ffn_hidden_size
        self.image_size, self.max_tiles = image_size, max_tiles
        super().__init__(**kwargs)
        # After the base init, which would reset the loaded parts' attention / experts implementation.
        if not isinstance(text_config, PretrainedConfig):
            text_config = dict(text_config or {})
            text_config = AutoConfig.for_model(text_config.pop("model_type", "deepseek_v3"), **text_config)
        self.text_config = text_config
        self.vision_config = (vision_config if isinstance(vision_config, PretrainedConfig)
                              else SiglipVisionConfig(**(vision_config or {})))


class MRopeRotaryEmbedding(torch.nn.Module):
    """The language model's own rotary table (cos, sin [b, s, d] in transformers' half-split layout; YaRN's scaling
    included) at M-RoPE ids [3, b, s] (t / h / w; each frequency pair follows the axis of its ``mrope_section``,
    chunked or, with ``mrope_interleaved``, alternating),
    or at 1D ids [b, s] as before."""

    def __init__(self, rotary: torch.nn.Module, mrope_section: list[int], mrope_interleaved: bool = False):
        super().__init__()
        self.rotary, self.mrope_section, self.mrope_interleaved = rotary, tuple(mrope_section), mrope_interleaved

    def forward(self, x, position_ids):
        if position_ids.dim() == 2:
            return self.rotary(x, position_ids)
        cos, sin = zip(*(self.rotary(x, ids) for ids in position_ids))  # 3 x [b, s, d]
        axis = tiling.mrope_axis_per_column(self.mrope_section, cos[0].shape[-1],
                                            sections_interleaved=self.mrope_interleaved).to(x.device)
        pick = axis.view(1, 1, 1, -1).expand(1, *cos[0].shape)
        return (torch.stack(cos).gather(0, pick)[0], torch.stack(sin).gather(0, pick)[0])


class PixelLMProjector(torch.nn.Module):
    """Tower features [views, gh, gw, c] -> the images' tokens in sequence order (names as the export's
    projector.safetensors: the Megatron projector's)."""

    def __init__(self, config: PixelLMConfig):
        super().__init__()
        width, hidden = config.vision_config.hidden_size * config.downsample ** 2, config.text_config.hidden_size
        self.downsample, self.position_code = config.downsample, config.image_position_code
        self.mlp = torch.nn.Module()  # Megatron's MultimodalProjector("mlp") keeps its MLP as .encoder
        self.mlp.encoder = torch.nn.Module()
        self.mlp.encoder.linear_fc1 = torch.nn.Linear(width, config.projector_ffn_hidden_size or hidden)
        self.mlp.encoder.linear_fc2 = torch.nn.Linear(config.projector_ffn_hidden_size or hidden, hidden)
        self.image_newline = torch.nn.Parameter(torch.zeros(hidden))
        self.view_separator = torch.nn.Parameter(torch.zeros(hidden))

    def forward(self, features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        grid = tiling.pixel_unshuffle(features, self.downsample)
        mlp = self.mlp.encoder
        views = mlp.linear_fc2(torch.nn.functional.gelu(mlp.linear_fc1(grid)))
        if self.position_code:
            views = tiling.with_position_code(views)
        return tiling.image_token_sequence(views, grids, self.image_newline, self.view_separator)


class PixelLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = PixelLMConfig
    base_model_prefix = "pixellm"
    _supports_sdpa = True

    def __init__(self, config: PixelLMConfig, language_model=None, vision_tower=None):
        super().__init__(config)
        self.vision_tower = vision_tower or SiglipVisionModel(config.vision_config)
        self.projector = PixelLMProjector(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        if config.mrope_section:
            model = self.language_model.model
            model.rotary_emb = MRopeRotaryEmbedding(model.rotary_emb, config.mrope_section, config.mrope_interleaved)

    @classmethod
    def from_pretrained(cls, directory, dtype=torch.float32, attn_implementation: str = "eager"):
        """The VLM from an export directory (its three parts, as written by ``python -m nemo_pixellm.export``)."""
        directory = Path(directory)
        _check_export(directory)
        joins = json.loads((directory / "pixellm.json").read_text())
        language_model = AutoModelForCausalLM.from_pretrained(directory / "language_model", dtype=dtype,
                                                              attn_implementation=attn_implementation)
        vision_tower = SiglipVisionModel.from_pretrained(directory / "vision_tower", dtype=dtype,
                                                         attn_implementation=attn_implementation)
        projector = load_file(directory / "projector.safetensors")
        config = PixelLMConfig(
            text_config=language_model.config, vision_config=vision_tower.config,
            image_token_id=joins["image_token_id"], patch_size=joins["patch_size"], downsample=joins["downsample"],
            mrope_section=joins.get("mrope_section"), projector_ffn_hidden_size=projector["mlp.encoder.linear_fc1.weight"].shape[0],
            image_size=joins.get("image_size", vision_tower.config.image_size), max_tiles=joins.get("max_tiles", 0),
            image_position_code=joins.get("image_position_code", False),
            mrope_interleaved=joins.get("mrope_interleaved", False))
        model = cls(config, language_model=language_model, vision_tower=vision_tower)
        model.projector.load_state_dict(projector)  # strict: every tensor present, none left over
        model.projector.to(dtype)
        model.generation_config = GenerationConfig.from_model_config(language_model.config)
        if (directory / "language_model" / "tokenizer.json").is_file():
            tokenizer = PixelTokenizer.from_dir(directory / "language_model")
            model.generation_config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        model.generation_config.suppress_tokens = [config.image_token_id]  # a placeholder has no image behind it
        return model.eval()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def image_features(self, pixel_values: torch.Tensor, image_grids: torch.Tensor) -> torch.Tensor:
        """Views [v, 3, T, T] -> [image tokens, hidden] in the order the image tokens appear."""
        tower = self.vision_tower(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        side = pixel_values.shape[-1] // self.config.patch_size
        return self.projector(tower.view(tower.shape[0], side, side, -1), image_grids)

    def forward(self, input_ids=None, pixel_values=None, image_grids=None, position_ids=None, attention_mask=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        """``position_ids``: M-RoPE ids [3, b, s] from the processor (``generate`` extends them per new token)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            image_positions = input_ids == self.config.image_token_id
            if pixel_values is not None and pixel_values.shape[0]:
                features = self.image_features(pixel_values.to(inputs_embeds.dtype), image_grids)
                if features.shape[0] != int(image_positions.sum()):
                    raise ValueError(f"{pixel_values.shape[0]} views give {features.shape[0]} image tokens, the "
                                     f"prompt has {int(image_positions.sum())} placeholders: use PixelLMProcessor")
                # row-major over (sample, position), as the Megatron model scatters them
                inputs_embeds = inputs_embeds.masked_scatter(image_positions[..., None], features)
        if attention_mask is None:  # 3D ids and no mask would look like packed sequences to transformers' masking
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        return self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                   attention_mask=attention_mask, past_key_values=past_key_values, labels=labels,
                                   use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, image_grids=None, is_first_iteration=False,
                                      **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):  # the images enter with the prompt only
            inputs.update(pixel_values=pixel_values, image_grids=image_grids)
        return inputs


class PixelLMProcessor:
    """Requests -> model inputs, laid out as the exported checkpoint's training data: images tiled (its view size,
    patch, downsample, max_tiles; no tiling with 3+ images), placed at their ``<image>`` placeholders (else before
    the text), the chat template, M-RoPE ids. A batch is left-padded, as ``generate`` expects."""

    def __init__(self, tokenizer: PixelTokenizer, layout):
        self.tokenizer, self.layout = tokenizer, layout

    @classmethod
    def from_pretrained(cls, directory):
        directory = Path(directory)
        _check_export(directory)
        joins = json.loads((directory / "pixellm.json").read_text())
        vision = json.loads((directory / "vision_tower" / "config.json").read_text())
        layout = SimpleNamespace(image_size=joins.get("image_size", vision["image_size"]), patch_size=joins["patch_size"],
                                 downsample=joins["downsample"], max_tiles=joins.get("max_tiles", 0))
        return cls(PixelTokenizer.from_dir(directory / "language_model"), layout)

    def __call__(self, text: str | list[str], images=None) -> BatchFeature:
        """One request (``text``, ``images``: a list of PIL images) or a batch (lists of each)."""
        texts, image_lists = ([text], [images or []]) if isinstance(text, str) else (text, images or [[]] * len(text))
        return self.batch([prompt_from_request(self.tokenizer, t, list(ims), self.layout)
                           for t, ims in zip(texts, image_lists)])

    def batch(self, prompts: list[Prompt]) -> BatchFeature:
        """Laid-out prompts (``nemo_pixellm.prompts``) -> one left-padded batch of model inputs."""
        length = max(len(p.tokens) for p in prompts)
        ids = torch.full((len(prompts), length), self.tokenizer.pad_id)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        positions = torch.zeros(3, len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            pad = length - len(prompt.tokens)
            ids[row, pad:], mask[row, pad:] = torch.tensor(prompt.tokens), 1
            positions[:, row, pad:] = tiling.mrope_positions(prompt.blocks, start=prompt.start)
        return BatchFeature({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                             "pixel_values": torch.cat([p.views for p in prompts]),
                             "image_grids": torch.cat([p.grids for p in prompts])})

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))


def answer_tokens(row: list[int], eos_id: int) -> list[int]:
    """A generated row up to its end token (transformers' generate pads the rows that ended first)."""
    return row[:row.index(eos_id)] if eos_id in row else row


class TokenStreamer:
    """transformers' streamer protocol -> ``on_token(row, token)`` for each new token until the row's end token
    (the first ``put`` is the prompt)."""

    def __init__(self, on_token, eos_id: int):
        self.on_token, self.eos_id, self.prompt_seen, self.done = on_token, eos_id, False, set()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if token == self.eos_id:
                self.done.add(row)
            elif row not in self.done:
                self.on_token(row, token)

    def end(self) -> None:
        pass
