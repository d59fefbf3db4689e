"""Reading Hugging Face checkpoint directories (``save_pretrained`` output) and checking that one fits the
configured module before any tensor is copied."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_hf_config(directory, key: str, expected_class: str) -> dict:
    """``config.json`` of a Hugging Face directory given as ``key``; a missing file names the key to fix."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: {key} must be a Hugging Face {expected_class} "
                                "directory (save_pretrained output)")
    return json.loads(config_file.read_text())


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors by name, without Transformer Engine's ``_extra_state`` (no copies)."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as plain tensors to save (detached copies)."""
    return {k: v.detach().contiguous().clone() for k, v in module_state(module).items()}


def save_hf_checkpoint(hf_state: dict[str, torch.Tensor], hf_config, directory) -> None:
    """Tensors already under Hugging Face names + their config -> a ``from_pretrained`` directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in hf_state.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    hf_config.save_pretrained(directory)


def refuse_misfit(directory, what: str, ours: dict, theirs: dict, keys: dict[str, str]) -> None:
    """Refuse a checkpoint whose config differs from ours: ``keys`` maps each HF key to the PixelLM key setting it."""
    wrong = [f"{keys[k]}={ours[k]} but {directory} has {k}={theirs.get(k)}" for k in keys if theirs.get(k) != ours[k]]
    if wrong:
        raise ValueError(f"{directory} does not fit the configured {what}: " + "; ".join(wrong))


def read_hf_checkpoint(directory) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face safetensors checkpoint directory (on-disk names: one entry per expert)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_exported_projector(projector: torch.nn.Module, directory, image_token_id: int) -> None:
    """An export's ``projector.safetensors`` into ``projector`` (one process); every tensor must exist and fit."""
    joins = json.loads((Path(directory) / "pixellm.json").read_text())
    if joins["image_token_id"] != image_token_id:
        raise ValueError(f"{directory} was exported with image token id {joins['image_token_id']}, the tokenizer's "
                         f"is {image_token_id}: train with its tokenizer (dataset.tokenizer_path={directory}/language_model)")
    state = load_file(Path(directory) / "projector.safetensors")
    params = dict(projector.named_parameters())
    if set(state) != set(params):
        raise KeyError(f"{directory}/projector.safetensors has {sorted(set(state) - set(params))} the projector lacks "
                       f"and lacks {sorted(set(params) - set(state))}")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:
                raise ValueError(f"{directory}/projector.safetensors: {name} has the shape {tuple(tensor.shape)}, the "
                                 f"projector's is {tuple(params[name].shape)} (model.projector_ffn_hidden_size, "
                                 "model.hidden_size or model.projector_downsample differ)")
            params[name].copy_(tensor)
