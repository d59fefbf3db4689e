"""The tiny tower's stand-in for SigLIP pretraining (nemo_pixellm/vision_pretrain.py): it fits its images' caption
tokens, and what it writes is a SiglipVisionModel directory that transformers and ``model.vision_pretrained_path``
read back to the same features."""

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionModel

from conftest import PYTHON, QUICK, ROOT, TINY_LM, TINY_VISION_56, build_pixellm, compose_cfg, run_train
from nemo_pixellm import tiling
from nemo_pixellm.hf.siglip import save_siglip_tower
from nemo_pixellm.vision_pretrain import (TowerPretrainArgs, caption_token_targets, pretrain_tower, rarity_weights,
                                          training_scenes)

SIZES = dict(vocab_size=256, seq_length=64, image_token_id=5, **TINY_LM, **TINY_VISION_56)


def test_pretraining_fits_the_captions_and_saves_a_siglip_tower(megatron_single_process, tmp_path):
    scenes = training_scenes(seed=3, count=48, size=56, ocr_share=0.5)
    assert sum(scene.kind == "ocr" for scene in scenes) == 24
    words = sorted({word for scene in scenes for word in scene.caption.split()})
    targets = caption_token_targets([[words.index(w) for w in scene.caption.split()] for scene in scenes], len(words))
    views = torch.stack([tiling.to_pixels(scene.image.convert("RGB")) for scene in scenes])

    tower = build_pixellm(megatron_single_process, **SIZES).vision_model
    args = TowerPretrainArgs(steps=80, batch=16, lr=3e-3, log_interval=40)
    token_map, losses = pretrain_tower(tower, views, targets, args, log=lambda line: None)
    weights = rarity_weights(targets, args.max_token_weight)
    tower.eval()
    with torch.no_grad():
        fitted = F.binary_cross_entropy_with_logits(token_map(tower(tiling.normalise(views)).flatten(1)), targets,
                                                    pos_weight=weights).item()
    # The best image-blind answer: each token's weighted base rate, the same for every image.
    frequency = targets.mean(0)
    blind_p = (weights * frequency / (weights * frequency + 1 - frequency)).clamp(1e-6, 1 - 1e-6)
    blind = F.binary_cross_entropy_with_logits(torch.logit(blind_p).expand_as(targets), targets,
                                               pos_weight=weights).item()
    print(f"balanced BCE over the set: {fitted:.3f} trained, {blind:.3f} image-blind; "
          f"steps 1-10 {sum(losses[:10]) / 10:.3f}, 71-80 {sum(losses[-10:]) / 10:.3f}")
    assert fitted < 0.5 * blind and sum(losses[-10:]) < 0.5 * sum(losses[:10])

    save_siglip_tower(tower, tmp_path / "tower")
    images = tiling.normalise(views[:4])
    with torch.no_grad():
        ours = tower(images).flatten(1, 2)
        hf = SiglipVisionModel.from_pretrained(tmp_path / "tower", dtype=torch.float32).eval()
        theirs = hf(pixel_values=images).last_hidden_state
        started = build_pixellm(megatron_single_process, seed=11, vision_pretrained_path=str(tmp_path / "tower"),
                                **SIZES).vision_model(images).flatten(1, 2)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
    torch.testing.assert_close(started, ours, rtol=0, atol=0)


def test_the_pretrained_path_is_a_plain_override(tmp_path):
    """README spells it ``model.vision_pretrained_path=<dir>``: no ``+`` (a key the config lacks) needed."""
    cfg = compose_cfg([f"model.vision_pretrained_path={tmp_path}", f"model.language_pretrained_path={tmp_path}",
                       f"model.pretrained_export_path={tmp_path}"])
    assert cfg.model.vision_pretrained_path == cfg.model.language_pretrained_path == str(tmp_path)


@pytest.mark.slow
def test_cli_pretrains_a_checkpoints_tower(trained_checkpoint, tmp_path):
    out = tmp_path / "tower"
    run = subprocess.run([PYTHON, "-m", "nemo_pixellm.vision_pretrain", f"checkpoint={trained_checkpoint}",
                          f"out={out}", "steps=20", "images=96", "batch=16", "heldout_images=30", "log_interval=10"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[vision_pretrain] step 20/20" in run.stdout and "held-out one-line text images" in run.stdout
    assert SiglipVisionModel.from_pretrained(out).config.num_hidden_layers == 2
    again = subprocess.run([PYTHON, "-m", "nemo_pixellm.vision_pretrain", f"checkpoint={trained_checkpoint}",
                            f"out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and f"out={out} already holds files" in again.stderr


@pytest.mark.slow
def test_a_checkpoint_loads_after_the_tower_it_started_from_moved(trained_checkpoint, cache_dir, tmp_path):
    """A stage-1 run starts its tower from a SiglipVisionModel directory; its checkpoint holds that tower, so
    evaluating, exporting or generating from it must not read the directory again (it may be gone)."""
    from nemo_pixellm.evaluate import load

    start, _, _ = load(str(trained_checkpoint))
    save_siglip_tower(start.vision_model, tmp_path / "tower")
    run_train(["+stage=stage1", *QUICK, "train.train_iters=1", "dataset.image_size=112", "dataset.max_tiles=4",
               f"model.vision_pretrained_path={tmp_path / 'tower'}", f"checkpoint.save={tmp_path / 'checkpoints'}",
               f"run_dir={tmp_path / 'run'}"], cache_dir)
    shutil.rmtree(tmp_path / "tower")
    loaded, _, _ = load(str(tmp_path / "checkpoints"))
    started = start.vision_model.state_dict()
    for name, value in loaded.vision_model.state_dict().items():  # stage 1 trains the projector alone
        torch.testing.assert_close(value, started[name], rtol=0, atol=0, msg=name)
