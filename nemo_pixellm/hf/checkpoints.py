"""Reading Hugging Face checkpoint directories (``save_pretrained`` output) and checking that one fits the
configured module before any tensor is copied."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_hf_config(directory, key: str, expected_class: str) -> dict:
    """``config.json`` of a Hugging Face directory given as ``key``; a missing file names the key to fix."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: {key} must be a Hugging Face {expected_class} "
                                "directory (save_pretrained output)")
    return json.loads(config_file.read_text())


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
