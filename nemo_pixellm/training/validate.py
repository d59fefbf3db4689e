"""Checks that fail before any process group, model or data is built, each naming the fix."""

from nemo_pixellm.models.backend import resolve_use_te


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change."""


def validate_layout(cfg, world_size: int) -> None:
    m = cfg.model
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    cp, ep = m.context_parallel_size, m.expert_model_parallel_size
    etp = m.expert_tensor_parallel_size or tp
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {model_parallel}: "
            "change model.tensor_model_parallel_size / pipeline_model_parallel_size / context_parallel_size "
            "or the number of processes"
        )
    dp = world_size // model_parallel
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.tensor_model_parallel_size={tp} does not divide the {m.num_attention_heads} attention heads"
        )
    if m.num_layers % pp:
        raise ConfigError(f"model.pipeline_model_parallel_size={pp} does not divide the {m.num_layers} layers")
    if pp > 1 and m.num_layers // pp < 1:
        raise ConfigError(f"pipeline_model_parallel_size={pp} leaves a stage with no layers")
    if m.num_moe_experts:
        if m.num_moe_experts % ep:
            divisors = [d for d in range(1, m.num_moe_experts + 1) if m.num_moe_experts % d == 0]
            raise ConfigError(
                f"model.expert_model_parallel_size={ep} does not divide the {m.num_moe_experts} experts; "
                f"valid sizes: {divisors}"
            )
        if (tp * cp * dp) % (ep * etp):
            raise ConfigError(
                f"expert parallel layout EP*ETP = {ep}*{etp} must divide TP*CP*DP = {tp}*{cp}*{dp} "
                f"({world_size} processes): lower model.expert_model_parallel_size or add processes"
            )
    if tp > 1 and not m.sequence_parallel:
        raise ConfigError(
            "tensor parallelism needs model.sequence_parallel=true (MoE requires it, and MLA's shared rope key "
            "gets its gradient summed across TP ranks through it)"
        )
    vision_heads = m.vision_num_attention_heads
    if vision_heads % tp:
        raise ConfigError(f"model.tensor_model_parallel_size={tp} does not divide the {vision_heads} vision heads")
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs % (mbs * dp):
        raise ConfigError(
            f"train.global_batch_size={gbs} is not a multiple of micro_batch_size*data_parallel = {mbs}*{dp}"
        )
    if m.mrope_section and sum(m.mrope_section) != m.qk_pos_emb_head_dim // 2:
        raise ConfigError(
            f"model.mrope_section {list(m.mrope_section)} must sum to qk_pos_emb_head_dim/2 = {m.qk_pos_emb_head_dim // 2}"
        )
    if cfg.model.seq_length != cfg.dataset.seq_length:
        raise ConfigError("model.seq_length and dataset.seq_length differ: set the top-level seq_length instead")
    if cfg.dataset.pack and resolve_use_te(m.use_te):
        raise ConfigError(
            "dataset.pack=true isolates packed samples with an attention mask that only the local backend applies "
            "(Transformer Engine's causal attention ignores it; its packed THD path is not wired yet): set "
            "model.use_te=false or dataset.pack=false"
        )
    validate_images(cfg.dataset)


def validate_images(data) -> None:
    """View sizes the tower can take, a well-formed resolution schedule, and a sequence that holds a view."""
    from nemo_pixellm.tiling import image_layout

    schedule = data.resolution_schedule or [[0.0, data.image_size]]
    fractions = [float(entry[0]) for entry in schedule]
    if fractions[0] != 0.0 or fractions != sorted(fractions) or fractions[-1] >= 1.0:
        raise ConfigError(
            f"dataset.resolution_schedule {schedule}: give [[fraction, size], ...] with fractions rising from 0.0 "
            "and below 1.0, e.g. [[0.0, 224], [0.4, 384], [0.8, 512]]"
        )
    if data.max_tiles < 0:
        raise ConfigError(f"dataset.max_tiles={data.max_tiles}: use 0 (global view only) or a positive grid limit")
    for size in [int(entry[1]) for entry in schedule] + [data.image_size]:
        if size < data.patch_size * data.downsample:
            raise ConfigError(f"image size {size} is smaller than patch_size*downsample = {data.patch_size * data.downsample}")
        view = image_layout(size, size, tile=size, patch=data.patch_size, downsample=data.downsample, max_tiles=0)
        if view.tokens + 8 > data.seq_length:
            raise ConfigError(
                f"a {size}px view takes {view.tokens} positions: seq_length={data.seq_length} leaves too little room "
                f"for text; raise seq_length to at least {view.tokens + 8} or lower the image size"
            )
