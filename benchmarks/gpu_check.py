"""What only a GPU can show, in one command on a machine with one NVIDIA GPU (H100/H200) and this repository:

    scripts/gpu_check.sh [--dry-run] [--out DIR]

Each check prints its figures as it finishes and one table at the end (also DIR/gpu_check.json). A check that
fails prints its error and the rest still run; the exit status is 1 if any failed. With Transformer Engine
installed the training check adds an FP8 run, the packing check runs TE's THD attention and the backend check
compares TE's layers with the local ones on the same weights (without TE it says "skipped"). ``--dry-run``
lists the checks and exits (CI runs it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_transformers import MODELS, forward_macs_per_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {}
DEVICE = "cuda"  # the checks' GPU; a CPU stand-in only for trying the script's own code without one


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()

# Two layers of the Pixel variant's language model (conf/variant/pixel.yaml): 288 experts top-8 in both.
PIXEL_SLICE = dict(num_layers=2, moe_layer_freq=[1, 1], hidden_size=1024, ffn_hidden_size=2048, num_attention_heads=8,
                   q_lora_rank=512, kv_lora_rank=128, qk_head_dim=64, qk_pos_emb_head_dim=64, v_head_dim=128,
                   num_moe_experts=288, moe_router_topk=8, moe_ffn_hidden_size=832,
                   moe_shared_expert_intermediate_size=2048, mrope_section=[8, 12, 12], vocab_size=102400)


def check(description: str):
    def register(fn):
        CHECKS[fn.__name__] = (description, fn)
        return fn
    return register


def have_te() -> bool:
    from nemo_pixellm.models.backend import HAVE_TE
    return HAVE_TE


def language_model(sizes: dict, seed: int = 7, use_te: bool = False):
    from nemo_pixellm.distributed import single_process_model
    model = single_process_model(
        seed, **sizes, use_te=use_te, seq_length=4096, layernorm_epsilon=1e-6, rotary_base=10000, rope_type="rope",
        moe_router_topk_scaling_factor=1.0, init_method_std=0.02, image_token_id=sizes["vocab_size"] - 1,
        vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
        vision_image_size=56)
    # Megatron allocates some parameters (the routers') on the current CUDA device even when it initialises on
    # CPU: put every one on the CPU, where the reference runs.
    return model.to("cpu")


def token_batch(vocab: int, batch: int, seq: int, device="cpu"):
    ids = torch.randint(0, vocab - 1, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return ids, torch.arange(seq, device=device).expand(batch, -1)


@check("torch, CUDA, GPU, optional GPU packages")
def environment():
    import megatron.core
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
           "megatron_core": megatron.core.__version__}
    for module in ("transformer_engine", "flash_attn", "apex"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "not installed"
    return out


def tiny_prompts():
    from nemo_pixellm import tiling
    from nemo_pixellm.generate import Prompt

    ids, _ = token_batch(MODELS["tiny"]["vocab_size"], 8, 32)
    return [Prompt(row.tolist(), [tiling.TextBlock(32)], torch.zeros(0, 3, 56, 56), torch.zeros(0, 2, dtype=torch.long))
            for row in ids]


@torch.no_grad()
def write_cpu_reference(path: Path) -> None:
    """The tiny model's weights, logits and greedy tokens on the CPU, in a process without CUDA (Megatron moves
    a router's CPU weights to the GPU whenever one is visible, so the reference cannot share the GPU's process)."""
    from nemo_pixellm.generate import generate

    model = language_model(MODELS["tiny"]).eval()
    ids, positions = token_batch(MODELS["tiny"]["vocab_size"], 4, 256)
    weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}  # no _extra_state
    torch.save({"state": weights, "logits": model(ids, positions, attention_mask=None),
                "tokens": generate(model, tiny_prompts(), eos_id=-1, pad_id=0, max_new_tokens=64)}, path)


def cpu_reference() -> dict:
    if not hasattr(cpu_reference, "value"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference.pt"
            subprocess.run([sys.executable, __file__, "--cpu-reference", str(path)], check=True,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            cpu_reference.value = torch.load(path, weights_only=True)
    return cpu_reference.value


def with_te_names(state: dict, model) -> dict:
    """The local backend's language-model weights under ``model``'s (TE's) names: TE fuses each norm into the
    linear after it, and the Hugging Face name map knows both spellings, so the weights go local -> HF -> TE."""
    from nemo_pixellm.hf.deepseek_v3 import hf_to_megatron, megatron_to_hf

    prefix = "language_model."
    local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    names = [k for k in model.language_model.state_dict() if not k.endswith("_extra_state")]
    return {prefix + k: v for k, v in hf_to_megatron(megatron_to_hf(local), names).items()}


def tiny_on_device(use_te: bool = False):
    """The tiny model with the CPU reference's weights, on DEVICE, full fp32 (no TF32). ``use_te``: Transformer
    Engine's layers holding the same language-model weights (text-only checks: the vision tower is not loaded)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = language_model(MODELS["tiny"], use_te=use_te)
    state = cpu_reference()["state"]
    if use_te:
        state = with_te_names(state, model)
    missing = model.load_state_dict(state, strict=False).missing_keys
    needed = [k for k in missing if not k.endswith("_extra_state") and (not use_te or k.startswith("language_model."))]
    if needed:
        raise RuntimeError(f"the CPU reference lacks {needed}")
    return model.to(DEVICE).eval()


@check("tiny language model, CUDA fp32 logits = CPU fp32 logits; bf16 beside fp32")
@torch.no_grad()
def logits_cuda_vs_cpu():
    want = cpu_reference()["logits"]
    gpu = tiny_on_device()
    ids, positions = token_batch(MODELS["tiny"]["vocab_size"], 4, 256, DEVICE)
    got = gpu(ids, positions, attention_mask=None).cpu()
    bf16 = gpu.to(torch.bfloat16)(ids, positions, attention_mask=None).float().cpu()
    return {"fp32_max_abs_diff": (got - want).abs().max().item(), "bf16_max_abs_diff": (bf16 - want).abs().max().item(),
            "max_abs_logit": want.abs().max().item(), "ok": (got - want).abs().max().item() <= 1e-4}


@check("tiny language model, Transformer Engine layers = local layers on the same weights: logits fp32, then bf16")
@torch.no_grad()
def te_vs_local_logits(use_te: bool | None = None):
    use_te = have_te() if use_te is None else use_te  # False only to try the check's own code without TE
    if use_te is False and DEVICE == "cuda":
        return {"skipped": "Transformer Engine is not installed"}
    ids, positions = token_batch(MODELS["tiny"]["vocab_size"], 4, 256, DEVICE)
    local, te = tiny_on_device(), tiny_on_device(use_te=use_te)
    want, got = local(ids, positions, attention_mask=None).cpu(), te(ids, positions, attention_mask=None).cpu()
    local16, te16 = local.to(torch.bfloat16), te.to(torch.bfloat16)
    want16 = local16(ids, positions, attention_mask=None).float().cpu()
    got16 = te16(ids, positions, attention_mask=None).float().cpu()
    out = {"fp32_max_abs_diff": (got - want).abs().max().item(),
           "bf16_max_abs_diff": (got16 - want16).abs().max().item(),  # both backends in bf16
           "te_bf16_vs_fp32_max_abs_diff": (got16 - want).abs().max().item()}
    out["max_abs_logit"] = want.abs().max().item()
    out["ok"] = out["fp32_max_abs_diff"] <= 1e-4
    return out


@check("20 steps of stage 2 (tiny) on CPU fp32, GPU fp32, GPU bf16 (and FP8 with TE), same initial weights: losses")
def train_entry_point():
    runs = {"cpu_fp32": ({"CUDA_VISIBLE_DEVICES": ""}, []), "gpu_fp32": ({}, []),
            "gpu_bf16": ({}, ["mixed_precision=bf16_mixed"])}
    if have_te():
        runs["gpu_fp8"] = ({}, ["mixed_precision=bf16_with_fp8_delayed_scaling_mixed"])
    out = {}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (env, overrides) in runs.items():
            run_dir = Path(tmp) / name
            start = time.time()
            proc = subprocess.run(
                # CPU initialisation everywhere: on a GPU Megatron otherwise draws the weights from the CUDA RNG
                [sys.executable, "-m", "nemo_pixellm.train", "+stage=stage2", "train.train_iters=20",
                 "++model.use_cpu_initialization=true",
                 f"run_dir={run_dir}", f"checkpoint.save={run_dir}/checkpoints", *overrides],
                cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")  # the error, not the config
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            losses[name] = [r["loss"] for r in rows]
            steps = [r["time"] for r in rows]
            out[f"{name}_s_per_step"] = statistics.median(b - a for a, b in zip(steps[5:], steps[6:]))
            out[f"{name}_wall_s"] = time.time() - start
            out[f"{name}_final_loss"] = losses[name][-1]
    out["gpu_fp32_vs_cpu_max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["gpu_fp32"], losses["cpu_fp32"]))
    out["gpu_bf16_vs_fp32_max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["gpu_bf16"], losses["gpu_fp32"]))
    out["ok"] = out["gpu_fp32_vs_cpu_max_loss_diff"] <= 1e-3
    return out


@check("greedy tokens on CUDA = on CPU (tiny, batch 8, 32 + 64 tokens); decode tokens/s")
@torch.no_grad()
def generate_cuda_vs_cpu():
    from nemo_pixellm.generate import generate

    want = cpu_reference()["tokens"]
    gpu, prompts = tiny_on_device(), tiny_prompts()
    generate(gpu, prompts, eos_id=-1, pad_id=0, max_new_tokens=64)  # warm-up
    synchronize()
    start = time.perf_counter()
    got = generate(gpu, prompts, eos_id=-1, pad_id=0, max_new_tokens=64)
    synchronize()
    seconds = time.perf_counter() - start
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) / (8 * 64)
    return {"same_tokens": same, "gpu_tokens_per_s": 8 * 64 / seconds, "ok": same == 1.0}


@check("THD packing (PackedSeqParams; TE's qkv_format=thd when TE is installed): per-sample losses of a packed "
       "4,096-token row = the samples alone, fp32")
@torch.no_grad()
def packed_thd():
    from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params
    from nemo_pixellm.data.dataset import packed_segments
    from packing_memory import packed_row, sample_lengths

    model, vocab = tiny_on_device(use_te=have_te()), MODELS["tiny"]["vocab_size"]
    lengths = sample_lengths(4096, 16)
    ids, _ = token_batch(vocab, 1, 4096, DEVICE)
    segments, positions = packed_row(lengths)
    positions = positions.to(DEVICE)
    params = get_packed_seq_params({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                    for k, v in packed_segments(segments).items()})
    packed = model(ids, positions, labels=ids, packed_seq_params=params)[0].cpu()
    alone, start = [], 0
    for n in lengths:
        part = ids[:, start:start + n]
        alone.append(model(part, torch.arange(n, device=DEVICE)[None], labels=part)[0].cpu())
        start += n
    difference = (packed - torch.cat(alone)).abs().max().item()
    return {"samples": len(lengths), "max_abs_loss_diff": difference, "transformer_engine": have_te(),
            "ok": difference <= 1e-4}


def bf16_matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start)


@check("2-layer Pixel slice (288 experts top-8), bf16, seq 4096: fwd+bwd tokens/s and TFLOP/s, experts looped vs grouped")
def pixel_slice_throughput():
    from nemo_pixellm.models.grouped_experts import GroupedLocalExperts

    peak = bf16_matmul_peak()
    model = language_model(PIXEL_SLICE).to(DEVICE, torch.bfloat16).train()
    batch, seq = 1, int(os.environ.get("GPU_CHECK_SEQ", 4096))  # shorter only to try the check on a CPU
    ids, positions = token_batch(PIXEL_SLICE["vocab_size"], batch, seq, DEVICE)
    labels = torch.roll(ids, -1, dims=1)
    flops = 3 * 2 * forward_macs_per_token(PIXEL_SLICE, seq) * batch * seq
    out = {"bf16_matmul_peak_tflops": peak / 1e12}
    losses = {}
    for mode, cuda_dtypes in (("looped", ()), ("grouped", (torch.bfloat16,))):
        GroupedLocalExperts.cuda_dtypes = cuda_dtypes
        times = []
        for i in range(6):
            model.zero_grad(set_to_none=True)
            synchronize()
            start = time.perf_counter()
            loss = model(ids, positions, attention_mask=None, labels=labels).float().mean()
            loss.backward()
            synchronize()
            times.append(time.perf_counter() - start)
            losses.setdefault(mode, loss.item())
        seconds = statistics.median(times[2:])
        out[f"{mode}_tokens_per_s"] = batch * seq / seconds
        out[f"{mode}_tflops"] = flops / seconds / 1e12
        out[f"{mode}_peak_fraction"] = flops / seconds / peak
    GroupedLocalExperts.cuda_dtypes = (torch.bfloat16,)
    out["grouped_vs_looped_loss_diff"] = abs(losses["grouped"] - losses["looped"])
    if DEVICE == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks alone")
    parser.add_argument("--cpu-reference", type=Path, help=argparse.SUPPRESS)  # the child write_cpu_reference runs in
    args = parser.parse_args()
    if args.cpu_reference:
        from nemo_pixellm import compat
        compat.enable(quiet=True)
        write_cpu_reference(args.cpu_reference)
        return 0
    names = args.only or list(CHECKS)
    if args.dry_run:
        for i, name in enumerate(names, 1):
            print(f"{i}. {name}: {CHECKS[name][0]}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or --dry-run to list the checks", file=sys.stderr)
        return 2
    from nemo_pixellm import compat
    compat.enable(quiet=True)
    results = {}
    for name in names:
        description, fn = CHECKS[name]
        print(f"== {name}: {description}", flush=True)
        start = time.time()
        try:
            results[name] = {"status": "ok", **fn()}
            if results[name].get("ok") is False:
                results[name]["status"] = "FAILED"
            elif "skipped" in results[name]:
                results[name]["status"] = "skipped"
        except Exception as error:  # one broken check must not hide the others' figures
            traceback.print_exc()
            results[name] = {"status": "FAILED", "error": f"{type(error).__name__}: {str(error)[:2000]}"}
        results[name]["seconds"] = round(time.time() - start, 1)
        print(json.dumps(results[name], indent=1, default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{'check':<26} {'status':<7} {'s':>6}  figures")
    for name, r in results.items():
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if k not in ("status", "seconds", "ok"))
        print(f"{name:<26} {r['status']:<7} {r['seconds']:>6}  {figures[:400]}")
    return int(any(r["status"] == "FAILED" for r in results.values()))


if __name__ == "__main__":
    sys.exit(main())
