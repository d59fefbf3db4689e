"""Export a trained PixelLM checkpoint to Hugging Face formats.

    python -m nemo_pixellm.export checkpoint=<checkpoint.save dir> out=<new dir> [ema=false]

Writes, under ``out``:
- ``language_model/``: a ``DeepseekV3ForCausalLM`` (MLA) or ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (dense
  grouped-query attention; hf/language_model.py) with config.json, model.safetensors, tokenizer.json. Exact for
  text: M-RoPE with text positions is the 1D RoPE those classes apply.
- ``vision_tower/``: a ``SiglipVisionModel`` (config.json, model.safetensors) at the tower's base resolution.
- ``projector.safetensors``: the pixel-unshuffle MLP, the image-newline and view-separator embeddings.
- ``pixellm.json``: what joins them (image token id, tiling and M-RoPE settings).
``nemo_pixellm.hf.PixelLMForConditionalGeneration.from_pretrained(out)`` joins them into the whole VLM in transformers.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from nemo_pixellm import compat

compat.enable(entry_point=True)  # version check and CPU layer, before Megatron loads

from nemo_pixellm.data import sources
from nemo_pixellm.hf.checkpoints import module_tensors
from nemo_pixellm.hf.language_model import write_hf_language_model
from nemo_pixellm.hf.siglip import save_siglip_tower


@dataclass
class ExportArgs:
    checkpoint: str = "???"
    out: str = "???"
    ema: bool = True  # export the EMA weights when the checkpoint has them


def export_model(model, out, tokenizer=None, data_config=None) -> None:
    """Write an in-memory PixelLMModel (one process: TP = PP = 1) under ``out`` (see the module docstring)."""
    out = Path(out)
    config = model.config
    language_model = model.language_model
    vocab_size = language_model.embedding.word_embeddings.weight.shape[0]
    write_hf_language_model(language_model.state_dict(), config, vocab_size, out / "language_model")
    if tokenizer is not None:
        tokenizer.tok.save(str(out / "language_model" / "tokenizer.json"))

    tower = model.vision_model
    save_siglip_tower(tower, out / "vision_tower")

    save_file(module_tensors(model.projector), out / "projector.safetensors", metadata={"format": "pt"})
    joins = {"image_token_id": model.image_token_id, "patch_size": tower.patch_size,
             "downsample": model.projector.downsample, "image_position_code": model.projector.position_code,
             "mrope_section": list(getattr(config, "mrope_section", None) or []),
             "mrope_interleaved": getattr(config, "mrope_interleaved", False),
             "layout": "global view + newline per row, view separator, local mosaic + newline per row (nemo_pixellm.tiling)"}
    if data_config is not None:
        joins |= {"image_size": data_config.image_size, "max_tiles": data_config.max_tiles}
    (out / "pixellm.json").write_text(json.dumps(joins, indent=2) + "\n")


def export(args: ExportArgs) -> dict:
    from nemo_pixellm.evaluate import load
    from nemo_pixellm.training.ema import load_ema_into

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new directory for out= (nothing was written)")
    model, data_config, directory = load(args.checkpoint)
    ema_used = load_ema_into(model, directory) if args.ema else False
    export_model(model, out, sources.load_tokenizer(data_config), data_config)
    return {"checkpoint": str(directory), "ema": ema_used, "out": str(out),
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}


def main(argv=None) -> None:
    from nemo_pixellm.evaluate import parse_args

    args = parse_args(ExportArgs, sys.argv[1:] if argv is None else argv, required=("checkpoint", "out"))
    try:
        print(json.dumps(export(args)))
    except (FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
