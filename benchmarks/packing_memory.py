"""Packed sequences as THD (Megatron's PackedSeqParams: attention within each sample) against the dense block-diagonal mask
they replaced: peak memory and time of one forward + backward of a packed row, and the per-token losses of both.

    .venv/bin/python benchmarks/packing_memory.py [--tokens 4096] [--samples 16] [--repeats 3]

The language model is vs_transformers.py's tiny decoder (MLA, MoE). Each layout runs in a process of its own,
so its peak resident memory (ru_maxrss) is its own: printed is the growth of that peak over what the process
held once the model and the inputs were built. Run it alone on the machine.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_transformers import MODELS  # noqa: E402  (the same tiny decoder as the speed comparison)


def sample_lengths(tokens: int, samples: int) -> list[int]:
    """``samples`` lengths summing to ``tokens``, uneven, the same on every call."""
    weights = torch.rand(samples, generator=torch.Generator().manual_seed(0)) + 0.5
    lengths = (weights / weights.sum() * tokens).long().clamp(min=2)
    lengths[-1] += tokens - int(lengths.sum())
    return lengths.tolist()


def packed_row(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment ids [1, t], positions [1, t] restarting at 0 in every sample) of one row packed with ``lengths``."""
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return segments, torch.cat([torch.arange(n) for n in lengths])[None]


def run_layout(layout: str, tokens: int, samples: int, repeats: int) -> dict:
    from nemo_pixellm import compat

    compat.enable(quiet=True)
    from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params

    from nemo_pixellm.data.dataset import packed_segments
    from nemo_pixellm.distributed import single_process_model

    torch.manual_seed(0)
    sizes = MODELS["tiny"]
    model = single_process_model(
        0, **sizes, seq_length=tokens, layernorm_epsilon=1e-6, rotary_base=10000, rope_type="rope",
        moe_router_topk_scaling_factor=1.0, init_method_std=0.05, image_token_id=sizes["vocab_size"] - 1,
        vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
        vision_image_size=56)
    segments, positions = packed_row(sample_lengths(tokens, samples))
    ids = torch.randint(0, sizes["vocab_size"] - 1, (1, tokens), generator=torch.Generator().manual_seed(1))
    if layout == "thd":
        inputs = {"packed_seq_params": get_packed_seq_params(packed_segments(segments))}
    else:  # the block-diagonal causal mask, True = masked out (Megatron's convention)
        visible = (segments[:, :, None] == segments[:, None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
        inputs = {"attention_mask": ~visible[:, None]}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(ids, positions, labels=ids, **inputs)
        loss.sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layout": layout, "peak_growth_mib": (peak - before) / 1024, "seconds": statistics.median(times),
            "losses": loss.detach()[0].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", choices=["thd", "mask"], help=argparse.SUPPRESS)  # one child's layout
    args = parser.parse_args()
    if args.layout:
        print(json.dumps(run_layout(args.layout, args.tokens, args.samples, args.repeats)))
        return
    results = {}
    for layout in ("thd", "mask"):
        out = subprocess.run([sys.executable, __file__, "--layout", layout, "--tokens", str(args.tokens),
                              "--samples", str(args.samples), "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{layout} failed:\n{out.stderr[-3000:]}")
        results[layout] = json.loads(out.stdout.strip().splitlines()[-1])
    difference = (torch.tensor(results["thd"]["losses"]) - torch.tensor(results["mask"]["losses"])).abs().max()
    print(f"packed row of {args.tokens} tokens, {args.samples} samples, tiny MLA + MoE decoder, forward + backward:")
    print(f"{'layout':44s}{'peak memory growth':>20s}{'time':>10s}")
    for layout, label in (("thd", "THD (PackedSeqParams, attention per sample)"), ("mask", "dense block-diagonal mask")):
        r = results[layout]
        print(f"{label:44s}{r['peak_growth_mib']:17.0f} MiB{r['seconds']:9.2f}s")
    print(f"per-token losses, THD vs mask: max |difference| {difference:.2e}")


if __name__ == "__main__":
    main()
