"""The plugin against Hugging Face transformers' DeepseekV3ForCausalLM on the same model: same weights (through
the plugin's Hugging Face name map), same batch, fp32, the same thread count, A/B steps interleaved.

    .venv/bin/python benchmarks/vs_transformers.py [--repeats 12] [--threads 2] [--parts train decode entry] [--json out.json]

Prints per case the medians, the median of the pairwise time ratios (plugin / transformers: < 1 is faster), whether
both decoded the same greedy tokens, and for the training steps the model FLOP/s against this machine's measured
fp32 matmul peak. A training step is forward, backward and one AdamW step of the language model alone (the same
torch optimizer on both sides: AdamW with its fused CPU kernel, which training uses on CPUs). ``entry`` compares
the tiny VLM's stage-2 step through the real entry point (``python -m nemo_pixellm.train``: Bridge's loop, its data
loader, logging, callbacks) with the same model's step in process (Bridge's setup, then only Megatron's forward-
backward schedule and the optimizer step on micro-batches read beforehand), each in its own process. Run it alone
on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nemo_pixellm import compat


# The language models compared: the tiny variant's decoder, and a compute-bound one.
MODELS = {
    "tiny": dict(num_layers=2, moe_layer_freq=[0, 1], hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 q_lora_rank=64, kv_lora_rank=64, qk_head_dim=16, qk_pos_emb_head_dim=16, v_head_dim=16,
                 num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64,
                 mrope_section=[2, 3, 3],
                 vocab_size=512),
    "h512": dict(num_layers=4, moe_layer_freq=[0, 1, 1, 1], hidden_size=512, ffn_hidden_size=1536,
                 num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_head_dim=64, qk_pos_emb_head_dim=32,
                 v_head_dim=64, num_moe_experts=16, moe_router_topk=4, moe_ffn_hidden_size=256,
                 moe_shared_expert_intermediate_size=256, mrope_section=[4, 6, 6], vocab_size=4096),
}
TRAIN_BATCH = {"tiny": (8, 128), "h512": (4, 512)}  # (batch, sequence)


def build_pair(name: str):
    """(plugin PixelLMModel, transformers DeepseekV3ForCausalLM) holding the same random weights."""
    from transformers import DeepseekV3ForCausalLM

    from nemo_pixellm.distributed import single_process_model
    from nemo_pixellm.hf.deepseek_v3 import deepseek_v3_config, write_hf_checkpoint

    sizes = MODELS[name]
    plugin = single_process_model(
        0, **sizes, seq_length=1024, layernorm_epsilon=1e-6, rotary_base=10000, rope_type="rope",
        moe_router_topk_scaling_factor=1.0, init_method_std=0.05, image_token_id=sizes["vocab_size"] - 1,
        vision_hidden_size=32, vision_num_layers=1, vision_num_attention_heads=2, vision_ffn_hidden_size=64,
        vision_image_size=56)
    hf_config = deepseek_v3_config(plugin.config, sizes["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts the on-disk expert layout as it loads
        write_hf_checkpoint(plugin.language_model.state_dict(), hf_config, tmp)
        hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp, output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"transformers did not load every weight: {info}")
    return plugin, hf


def forward_macs_per_token(s: dict, seq: int) -> float:
    """Multiply-accumulates per token of one forward of the language model with sizes ``s`` (MODELS' keys):
    every matmul it does (active experts only), causal attention counted at half the square."""
    h, heads = s["hidden_size"], s["num_attention_heads"]
    qk = s["qk_head_dim"] + s["qk_pos_emb_head_dim"]
    attention = (h * s["q_lora_rank"] + s["q_lora_rank"] * heads * qk + h * (s["kv_lora_rank"] + s["qk_pos_emb_head_dim"])
                 + s["kv_lora_rank"] * heads * (s["qk_head_dim"] + s["v_head_dim"]) + heads * s["v_head_dim"] * h
                 + seq / 2 * heads * (qk + s["v_head_dim"]))
    moe = (h * s["num_moe_experts"] + 3 * h * s["moe_ffn_hidden_size"] * s["moe_router_topk"]
           + 3 * h * s["moe_shared_expert_intermediate_size"])
    dense = 3 * h * s["ffn_hidden_size"]
    layers = sum(moe if m else dense for m in s["moe_layer_freq"])
    return s["num_layers"] * attention + layers + h * s["vocab_size"]


def matmul_peak_flops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(times)


def interleaved(cases: dict, repeats: int, warmup: int = 2) -> dict:
    """{label: fn} -> {label: [seconds per call]}, the labels' calls alternating."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times = {label: [] for label in cases}
    for _ in range(repeats):
        for label, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return times


def ratio(times: dict) -> float:
    """Median of the pairwise plugin / transformers ratios."""
    return statistics.median(p / h for p, h in zip(times["plugin"], times["transformers"]))


def train_part(name: str, repeats: int, peak: float) -> dict:
    plugin, hf = build_pair(name)
    plugin.train(), hf.train()
    batch, seq = TRAIN_BATCH[name]
    ids = torch.randint(0, MODELS[name]["vocab_size"] - 1, (batch, seq), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, dims=1)
    positions = torch.arange(seq).expand(batch, -1)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for m in (plugin, hf)}

    def plugin_step():
        loss = plugin(ids, positions, attention_mask=None, labels=targets).mean()
        loss.backward()
        optimizers[plugin].step()
        optimizers[plugin].zero_grad(set_to_none=True)

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()  # transformers shifts the labels itself
        optimizers[hf].step()
        optimizers[hf].zero_grad(set_to_none=True)

    times = interleaved({"plugin": plugin_step, "transformers": hf_step}, repeats)
    flops = 3 * 2 * forward_macs_per_token(MODELS[name], seq) * batch * seq
    out = {"case": f"training step, {name} (seq {seq} x {batch})", "ratio": ratio(times)}
    for label, t in times.items():
        out[label] = statistics.median(t)
        out[f"{label}_peak_fraction"] = flops / statistics.median(t) / peak
    return out


@torch.no_grad()
def decode_part(name: str, batch: int, repeats: int, prompt: int = 32, new: int = 64) -> dict:
    from nemo_pixellm import tiling
    from nemo_pixellm.generate import Prompt, generate

    plugin, hf = build_pair(name)
    plugin.eval(), hf.eval()
    ids = torch.randint(0, MODELS[name]["vocab_size"] - 1, (batch, prompt), generator=torch.Generator().manual_seed(2))
    prompts = [Prompt(row.tolist(), [tiling.TextBlock(prompt)], torch.zeros(0, 3, 56, 56), torch.zeros(0, 2, dtype=torch.long))
               for row in ids]
    outputs = {}

    def plugin_decode():
        outputs["plugin"] = generate(plugin, prompts, eos_id=-1, pad_id=0, max_new_tokens=new)

    def hf_decode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs["transformers"] = out[:, prompt:].tolist()

    times = interleaved({"plugin": plugin_decode, "transformers": hf_decode}, repeats, warmup=1)
    same = sum(a == b for p, h in zip(outputs["plugin"], outputs["transformers"]) for a, b in zip(p, h)) / (batch * new)
    out = {"case": f"greedy decoding, {name}, batch {batch} ({prompt} + {new} tokens)", "ratio": ratio(times),
           "same_tokens": same}
    for label, t in times.items():
        out[label] = statistics.median(t)
        out[f"{label}_tokens_per_s"] = batch * new / statistics.median(t)
    return out


# The entry-point comparison's run: the tiny variant's stage 2 (pretraining), no validation, no checkpoint.
ENTRY_OVERRIDES = ["+stage=stage2", "validation.eval_interval=null", "logger.log_interval=10"]


def run_child(command: list[str]) -> None:
    """Runs one side of the entry-point comparison; a failure shows the end of its output."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {out.returncode}:\n{out.stderr[-3000:]}")


def entry_point_step_times(steps: int, run_dir: Path) -> list[float]:
    """Seconds per training step of ``python -m nemo_pixellm.train``, from the times metrics.jsonl records."""
    command = [sys.executable, "-m", "nemo_pixellm.train", *ENTRY_OVERRIDES, f"train.train_iters={steps}",
               f"run_dir={run_dir}"]
    run_child(command)
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:])]


def in_process_step_times(steps: int, run_dir: Path) -> list[float]:
    """Seconds per step of the same model on the same kind of micro-batches without the loop: Bridge's setup
    builds model, optimizer and data as the entry point does; the micro-batches are read first; each step is
    then Megatron's forward-backward schedule with PixelLM's forward step, and the optimizer step."""
    from functools import partial

    from hydra import compose, initialize_config_dir
    from megatron.bridge.data.utils import get_dataset_provider
    from megatron.bridge.training.config import runtime_config_update
    from megatron.bridge.training.setup import setup
    from megatron.bridge.training.state import GlobalState
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_pixellm.train import CONF_DIR, _free_port
    from nemo_pixellm.training.config import build_config
    from nemo_pixellm.training.fused_adam import fuse_cpu_adam
    from nemo_pixellm.training.run_state import RunState
    from nemo_pixellm.training.step import ForwardStep

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[*ENTRY_OVERRIDES, f"train.train_iters={steps}",
                                                       f"run_dir={run_dir}"])
    state = GlobalState()
    state.cfg = build_config(cfg)
    runtime_config_update(state.cfg)
    built = setup(state, get_dataset_provider(state.cfg.dataset))
    fuse_cpu_adam(built.optimizer)  # as the entry point's FusedCPUAdam callback does
    train = state.cfg.train
    micro = train.global_batch_size // train.micro_batch_size
    batches = [[next(built.train_data_iterator) for _ in range(micro)] for _ in range(steps)]
    forward_backward = get_forward_backward_func()
    forward_step = partial(ForwardStep(RunState()), state)
    times = []
    for group in batches:
        start = time.perf_counter()
        for chunk in built.model:
            chunk.zero_grad_buffer()
        built.optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter(group), model=built.model,
                         num_microbatches=micro, seq_length=state.cfg.model.seq_length,
                         micro_batch_size=train.micro_batch_size, forward_only=False)
        built.optimizer.step()
        built.scheduler.step(increment=train.global_batch_size)
        times.append(time.perf_counter() - start)
    return times


def entry_part(steps: int, rounds: int) -> dict:
    """The tiny VLM's stage-2 step through the entry point vs in process, each in a child process, the two
    alternating ``rounds`` times (this box's speed drifts between minutes); the first tenth of each run's steps
    is left out as warm-up. The ratio is the median of the rounds' entry / in-process medians."""
    skip, entry, in_process = steps // 10, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round in range(rounds):
            entry.append(statistics.median(entry_point_step_times(steps, Path(tmp) / f"entry{round}")[skip:]))
            out = Path(tmp) / f"in_process{round}.json"
            run_child([sys.executable, __file__, "--in-process-step", str(steps), "--json", str(out)])
            in_process.append(statistics.median(json.loads(out.read_text())[skip:]))
            print(f"  round {round + 1}: entry point {entry[-1] * 1e3:.1f} ms, in process {in_process[-1] * 1e3:.1f} ms",
                  flush=True)
    return {"case": f"tiny VLM stage-2 step, entry point vs in process ({rounds} x {steps} steps)",
            "entry_point": statistics.median(entry), "in_process": statistics.median(in_process),
            "ratio": statistics.median(e / i for e, i in zip(entry, in_process))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["train", "decode", "entry"], choices=["train", "decode", "entry"])
    parser.add_argument("--entry-steps", type=int, default=60)
    parser.add_argument("--entry-rounds", type=int, default=5)  # this box's speed drifts by 1.5x within minutes
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--in-process-step", type=int, help=argparse.SUPPRESS)  # entry_part's child
    args = parser.parse_args()
    if args.in_process_step:
        compat.enable(entry_point=True)
        with tempfile.TemporaryDirectory() as tmp:
            args.json.write_text(json.dumps(in_process_step_times(args.in_process_step, Path(tmp))))
        return
    compat.enable(quiet=True)
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s")
    rows = []
    if "train" in args.parts:
        for name in MODELS:
            rows.append(train_part(name, args.repeats, peak))
            r = rows[-1]
            print(f"{r['case']:<48} plugin {r['plugin'] * 1e3:8.1f} ms ({r['plugin_peak_fraction']:.0%} of peak)   "
                  f"transformers {r['transformers'] * 1e3:8.1f} ms ({r['transformers_peak_fraction']:.0%})   "
                  f"plugin/HF {r['ratio']:.3f}", flush=True)
    if "decode" in args.parts:
        for name in MODELS:
            for batch in (1, 8):
                rows.append(decode_part(name, batch, max(3, args.repeats // 3)))
                r = rows[-1]
                print(f"{r['case']:<48} plugin {r['plugin_tokens_per_s']:8.0f} tok/s   transformers "
                      f"{r['transformers_tokens_per_s']:8.0f} tok/s   plugin/HF time {r['ratio']:.3f}   "
                      f"same greedy tokens {r['same_tokens']:.0%}", flush=True)
    if "entry" in args.parts:
        rows.append(entry_part(args.entry_steps, args.entry_rounds))
        r = rows[-1]
        print(f"{r['case']:<48} entry point {r['entry_point'] * 1e3:.1f} ms   in process {r['in_process'] * 1e3:.1f} ms   "
              f"entry / in process {r['ratio']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
