"""Per-GPU memory estimate of a variant under a parallel layout, checked before a cluster job is submitted.

Parameters are counted on the model itself, built on the meta device (``nemo_pixellm.info.meta_model``), and
grouped by how Megatron shards them: routed experts over EP x ETP, tensor-parallel weights (Megatron marks
them ``tensor_model_parallel``) over TP, the rest replicated; decoder layers split over PP, the embedding,
vision tower and projector on the first pipeline stage and the output layer on the last.

Bytes per parameter, bf16 mixed precision: bf16 weight 2 + fp32 main grad 4 + fp32 master copy 4 + Adam m and v
8 (fp32 runs: weight 4, no master copy). With ``optimizer.use_distributed_optimizer`` the master copy and Adam
states are sharded over the data-parallel ranks (experts: over the expert-data-parallel ranks), as Megatron's
distributed optimizer does.

Activations are a rough term (within about 2x; no activation recompute assumed): per transformer layer and
micro-batch 34*s*b*h/TP bytes (Korthikanti et al. 2022, bf16 with sequence parallelism and flash attention),
plus the routed experts' dispatched tokens s*b*k*(2h + 3f)*2/TP bytes per MoE layer, the same 34-byte rule for
the vision tower over its image tokens, times the micro-batches a 1F1B pipeline keeps in flight on its first stage
(min(PP, micro-batches)), plus the last stage's logits s*b*V/TP*6 bytes (bf16 logits, fp32 softmax).
A fixed OVERHEAD_GIB covers the CUDA context, communication buffers and allocator fragmentation.
"""

import dataclasses
from collections import Counter

from nemo_pixellm.training.validate import ConfigError

GIB = 2**30
OVERHEAD_GIB = 4.0


@dataclasses.dataclass
class MemoryEstimate:
    weights_and_grads: float  # GiB per GPU, on the fullest pipeline stage
    optimizer: float
    activations: float
    experts: float  # the routed experts' part of weights, grads and optimizer states
    overhead: float = OVERHEAD_GIB

    @property
    def total(self) -> float:
        return self.weights_and_grads + self.optimizer + self.activations + self.overhead

    def describe(self, gpu_memory_gb=None) -> str:
        of = f" of {gpu_memory_gb} GiB" if gpu_memory_gb else ""
        return (f"{self.total:.1f} GiB per GPU{of} = weights+grads {self.weights_and_grads:.1f} + optimizer "
                f"{self.optimizer:.1f} + activations {self.activations:.1f} + overhead {self.overhead:.1f} "
                f"(routed experts: {self.experts:.1f})")


def parameter_groups(model) -> Counter:
    """Parameter counts keyed by (pipeline placement, sharding): placement first | last | layers,
    sharding expert | tp | replicated."""
    groups = Counter()
    for name, param in model.named_parameters():
        if name.startswith(("vision_model.", "projector.")) or ".embedding." in name:
            where = "first"
        elif ".output_layer." in name:
            where = "last"
        else:
            where = "layers"
        if ".experts." in name:  # routed experts (shared experts are named shared_experts)
            how = "expert"
        elif getattr(param, "tensor_model_parallel", False):
            how = "tp"
        else:
            how = "replicated"
        groups[where, how] += param.numel()
    return groups


def unsharded(provider):
    """A copy of the provider with every parallel size 1, to build (and count) the whole model on one process,
    on the local backend: it holds the same parameters as TE's, and a login node may not have TE."""
    return dataclasses.replace(
        provider, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False, use_te=False,
    )


def _moe_layers(m) -> int:
    freq = m.moe_layer_freq
    return sum(freq) if isinstance(freq, (list, tuple)) else m.num_layers // freq


def estimate_memory(container, world_size: int, groups: Counter) -> MemoryEstimate:
    m, train = container.model, container.train
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    ep, etp = m.expert_model_parallel_size, m.expert_tensor_parallel_size or tp
    dp, expert_dp = world_size // (tp * pp * cp), world_size // (ep * etp * pp)
    half = container.mixed_precision is not None
    weight_grad_bytes = (2 if half else 4) + 4
    optimizer_bytes = (4 if half else 0) + 8
    shard = container.optimizer.use_distributed_optimizer

    def per_gpu(where, how):
        n = groups[where, how] / {"expert": ep * etp, "tp": tp, "replicated": 1}[how]
        return n / pp if where == "layers" else n

    # The fullest pipeline stage: the first (embedding, vision) or the last (output layer); one stage when PP=1.
    placements = [("first", "last", "layers")] if pp == 1 else [("first", "layers"), ("last", "layers")]
    dense, experts = max(
        (sum(per_gpu(w, h) for w in places for h in ("tp", "replicated")), per_gpu("layers", "expert"))
        for places in placements
    )
    expert_gib = experts * (weight_grad_bytes + optimizer_bytes / (expert_dp if shard else 1)) / GIB

    s, b, h = container.dataset.seq_length // cp, train.micro_batch_size, m.hidden_size  # this CP rank's tokens
    micro_batches = train.global_batch_size // (b * dp)
    in_flight = min(pp, micro_batches)
    lm_layer = 34 * s * b * h / tp
    moe_layer = s * b * m.moe_router_topk * (2 * h + 3 * (m.moe_ffn_hidden_size or 0)) * 2 / tp
    data = container.dataset
    view = max([data.image_size] + [int(size) for _, size in (getattr(data, "resolution_schedule", None) or [])])
    image_tokens = b * (1 + getattr(data, "max_tiles", 0)) * (view // data.patch_size) ** 2
    vision = 34 * image_tokens * m.vision_hidden_size / tp * m.vision_num_layers
    activations = (lm_layer * m.num_layers + moe_layer * (m.num_moe_experts and _moe_layers(m))) / pp + vision
    logits = s * b * m.vocab_size / tp * 6
    return MemoryEstimate(
        weights_and_grads=(dense + experts) * weight_grad_bytes / GIB,
        optimizer=(dense * optimizer_bytes / (dp if shard else 1)
                   + experts * optimizer_bytes / (expert_dp if shard else 1)) / GIB,
        activations=(activations * in_flight + logits) / GIB,
        experts=expert_gib,
    )


def check_fits(estimate: MemoryEstimate, gpu_memory_gb: float, container, where: str) -> None:
    """A ConfigError naming the knobs that shrink the largest terms when the estimate exceeds the GPU."""
    if estimate.total <= gpu_memory_gb:
        return
    m = container.model
    fixes = []
    if estimate.experts > estimate.total / 3:
        fixes.append(f"raise model.expert_model_parallel_size (now {m.expert_model_parallel_size}; a divisor of "
                     f"{m.num_moe_experts} that divides TP*CP*DP) or model.pipeline_model_parallel_size")
    if not container.optimizer.use_distributed_optimizer:
        fixes.append("set optimizer.use_distributed_optimizer=true")
    if estimate.activations > estimate.total / 3:
        fixes.append("lower train.micro_batch_size or seq_length, or raise model.tensor_model_parallel_size "
                     "(with model.sequence_parallel=true)")
    fixes.append("raise cluster.nodes")
    raise ConfigError(f"{where} does not fit in GPU memory: about {estimate.describe(gpu_memory_gb)}; "
                      + "; ".join(fixes))
