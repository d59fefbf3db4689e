"""`python -m nemo_pixellm.info`: parameter counts of the real variants, counted on the model itself
(meta device), against the reference formula and the brief's headline figures."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

# reference.md section 1: hidden, layers, heads, q_lora, kv_lora, routed FFN, shared FFN; and the brief's figures.
VARIANTS = {
    "pixel": ((1024, 8, 8, 512, 128, 832, 2048), 6.07e9, 339e6),
    "megapixel": ((2048, 16, 16, 1024, 256, 928, 4096), 27.05e9, 1.50e9),
    "gigapixel": ((4096, 32, 32, 2048, 512, 1440, 8192), 168.0e9, 9.42e9),
}


def reference_counts(h, layers, heads, q_lora, kv_lora, expert_ffn, shared_ffn,
                     vocab=102400, experts=288, k=8, nope=64, rope=64, v=128):
    mla = (h * q_lora + q_lora + q_lora * heads * (nope + rope) + h * (kv_lora + rope) + kv_lora
           + kv_lora * heads * (nope + v) + heads * v * h)
    moe_total = h * experts + experts * 3 * h * expert_ffn + 3 * h * shared_ffn
    moe_active = h * k + k * 3 * h * expert_ffn + 3 * h * shared_ffn
    total = vocab * h + layers * (2 * h + mla + moe_total) + h
    active = vocab * h + layers * (2 * h + mla + moe_active) + h
    return total, active


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_info_counts(variant, cache_dir):
    out = subprocess.run([sys.executable, "-m", "nemo_pixellm.info", f"variant={variant}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NEMO_PIXELLM_CACHE": str(cache_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    shape, brief_total, brief_active = VARIANTS[variant]
    total, active = reference_counts(*shape)
    print(variant, {k: report[k] for k in ("llm_total", "llm_active", "llm_total_untied", "vision", "projector")})
    assert report["llm_total"] == total
    assert report["llm_active"] == active
    assert report["llm_total"] == pytest.approx(brief_total, rel=2e-3)
    assert report["llm_active"] == pytest.approx(brief_active, rel=5e-3)
    # Untied output layer (the model as built) adds vocab * hidden to both.
    assert report["llm_total_untied"] - report["llm_total"] == 102400 * shape[0]
    assert report["llm_active_untied"] - report["llm_active"] == 102400 * shape[0]
    # SigLIP-SO400M/14 at 384: patch conv + 27x27 positions + 27 layers + final norm.
    w, f, layers = 1152, 4304, 27
    siglip = (3 * 14 * 14 * w + w) + 27 * 27 * w + layers * (4 * w * w + 4 * w + 2 * w * f + f + w + 4 * w) + 2 * w
    assert report["vision"] == siglip
    kv = report["kv_cache_bytes_per_token"]
    assert kv["mla_per_layer"] == (shape[4] + 64) * 2  # latent c_kv + shared rope key, bf16
    assert kv["mha_per_layer"] == shape[2] * (64 + 64 + 128) * 2


def test_info_counts_tied_embeddings_once(cache_dir):
    """model.share_embeddings_and_output_weights=true: the model as built is the brief's count (one matrix)."""
    out = subprocess.run([sys.executable, "-m", "nemo_pixellm.info", "variant=pixel",
                          "model.share_embeddings_and_output_weights=true"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "NEMO_PIXELLM_CACHE": str(cache_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    total, active = reference_counts(*VARIANTS["pixel"][0])
    assert (report["llm_total_untied"], report["llm_active_untied"]) == (report["llm_total"], report["llm_active"]) \
        == (total, active)
