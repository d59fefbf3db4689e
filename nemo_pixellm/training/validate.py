"""Checks that fail before any process group, model or data is built, each naming the fix.

``build_config`` runs them all, so ``nemo_pixellm.launch --dry-run`` on a login node catches the same errors.
"""

import json
from pathlib import Path

from nemo_pixellm.models.backend import resolve_use_te
from nemo_pixellm.tiling import POSITION_CODE_CHANNELS, mrope_axis_per_column


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change."""


# Provider fields build_config sets from elsewhere: the key a user sets instead.
DERIVED_MODEL_KEYS = {
    "vision_patch_size": "dataset.patch_size (the data cuts the patches the tower embeds)",
    "projector_downsample": "dataset.downsample (the data lays out tokens after the pixel-unshuffle)",
    "image_token_id": "the tokenizer (dataset.tokenizer_path): its <image> token",
    "trainable_modules": "stage.trainable",
}
MODULE_NAMES = ("vision_model", "projector", "language_model")


def validate_model_keys(model_values: dict) -> None:
    for key, instead in DERIVED_MODEL_KEYS.items():
        if key in model_values:
            raise ConfigError(f"model.{key} is set from {instead}: drop model.{key} and set that instead")
    for key, kind in (("vision_pretrained_path", "SiglipVisionModel"), ("language_pretrained_path", "DeepseekV3ForCausalLM / LlamaForCausalLM")):
        path = model_values.get(key)
        if path and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.{key}={path} is not a Hugging Face {kind} directory (no config.json there): "
                              "give the directory save_pretrained wrote")
    no_rope, layers = model_values.get("no_rope_freq"), model_values.get("num_layers")
    if isinstance(no_rope, int) and no_rope and layers and layers % no_rope:  # before Megatron asserts it
        raise ConfigError(f"model.no_rope_freq={no_rope} (one layer in {no_rope} without RoPE) does not divide the "
                          f"{layers} layers: give a divisor, or a 0/1 list with one entry per layer")
    path = model_values.get("pretrained_export_path")
    if path and not (Path(path) / "pixellm.json").is_file():
        raise ConfigError(f"model.pretrained_export_path={path} is not a PixelLM export (no pixellm.json there): give "
                          "the out= directory of python -m nemo_pixellm.export")


def _check_shards(path, key: str, task: str) -> None:
    """A data_prep shard set whose first record has what ``task`` reads."""
    from nemo_pixellm.data.samples import check_fields
    from nemo_pixellm.data.shards import ShardReader

    try:
        reader = ShardReader(path, key)
        record = reader.first_record()
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if record is None or "json" not in record:
        return  # unreadable: training skips and counts it like any bad record
    try:
        meta = json.loads(record["json"])
    except ValueError:
        return
    try:
        check_fields(meta, task)
    except ValueError as error:
        tool = reader.manifest.get("settings", {}).get("tool")
        written = f"written by data_prep.{tool}; " if tool else ""
        raise ConfigError(f"{key}={path} does not hold dataset.task={task} records ({written}"
                          f"first record: {error}): choose the task the shards were written for "
                          "(caption, vqa, chat, text) or another directory") from None


def validate_data(data) -> None:
    """The dataset section: every path, the task, the shares; what a data loader worker would hit later."""
    from nemo_pixellm.data.samples import TASKS

    if data.task not in TASKS:
        raise ConfigError(f"dataset.task={data.task}: choose one of {', '.join(TASKS)}")
    if not 0.0 <= data.text_ratio < 1.0:
        raise ConfigError(f"dataset.text_ratio={data.text_ratio}: give the text-only share of tokens in [0, 1)")
    if not 0.0 <= data.chat_ratio < 1.0:
        raise ConfigError(f"dataset.chat_ratio={data.chat_ratio}: give the conversations' share of the "
                          "vision-language tokens in [0, 1)")
    if data.chat_ratio > 0 and data.task not in ("caption", "vqa"):
        raise ConfigError(f"dataset.chat_ratio={data.chat_ratio} mixes the images' conversations into a caption or "
                          f"vqa stage; dataset.task={data.task} has none to mix: set dataset.chat_ratio=0")
    if not 0.0 <= data.max_bad_fraction < 1.0:
        raise ConfigError(f"dataset.max_bad_fraction={data.max_bad_fraction}: give a share in [0, 1) "
                          "(0 stops at the first bad record)")
    if data.tokenizer_path is not None:
        file = Path(data.tokenizer_path)
        if not (file / "tokenizer.json").is_file() and not (file.is_file() and file.suffix == ".json"):
            raise ConfigError(f"dataset.tokenizer_path={data.tokenizer_path} holds no tokenizer.json: point it at a "
                              "Hugging Face tokenizer directory, or leave it unset for the synthetic BPE")
    if data.synthetic_kind_shares is not None:
        if data.path is not None:
            raise ConfigError("dataset.synthetic_kind_shares sets the synthetic set's mix; with dataset.path the "
                              "shards' own mix is used: drop dataset.synthetic_kind_shares")
        from nemo_pixellm.data.synthetic import kind_weights
        try:
            kind_weights(data.synthetic_kind_shares)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if data.path is None:
        if data.task == "text":
            raise ConfigError("dataset.task=text trains on text-only records, which the synthetic set does not have "
                              "(its records are images with captions, questions and conversations): set "
                              "dataset.path=<text shards from data_prep.text>, or keep an image task and mix in "
                              "synthetic text with dataset.text_ratio=0.3")
        if data.valid_path is not None:
            raise ConfigError("dataset.valid_path is used with dataset.path only (the synthetic set brings its own "
                              "held-out split): set dataset.path too, or drop dataset.valid_path")
        return
    _check_shards(data.path, "dataset.path", data.task)
    if data.chat_ratio > 0:
        _check_shards(data.path, "dataset.path", "chat")
    if data.valid_path is not None:
        _check_shards(data.valid_path, "dataset.valid_path", data.task)
    if data.text_ratio > 0:
        if data.text_path is None:
            raise ConfigError(f"dataset.text_ratio={data.text_ratio} mixes in text-only shards: set "
                              "dataset.text_path=<data_prep.text output>, or dataset.text_ratio=0")
        _check_shards(data.text_path, "dataset.text_path", "text")


def validate_stage(stage) -> None:
    trainable = stage.get("trainable")
    unknown = sorted(set(trainable or ()) - set(MODULE_NAMES))
    if unknown:
        raise ConfigError(f"stage.trainable names {unknown}: choose from {', '.join(MODULE_NAMES)} (null = all)")
    init_from = stage.get("init_from")
    if init_from:
        path = Path(init_from)
        if not path.exists():
            raise ConfigError(f"stage.init_from={init_from} does not exist (give the previous stage's checkpoint.save)")
        if not (path / "latest_checkpointed_iteration.txt").is_file() and not path.name.startswith("iter_"):
            raise ConfigError(f"stage.init_from={init_from} is not a checkpoint directory (no "
                              "latest_checkpointed_iteration.txt): give the previous stage's checkpoint.save after "
                              "that stage has finished")


# What makes two PixelLM models different models (the provider's fields; vision ones only where both have them).
ARCHITECTURE = ("multi_latent_attention", "share_embeddings_and_output_weights",
                "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "num_moe_experts",
                "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size", "q_lora_rank",
                "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "vocab_size", "vision_hidden_size",
                "vision_num_layers", "vision_num_attention_heads", "vision_ffn_hidden_size", "projector_ffn_hidden_size")


def check_same_model(init_from, model) -> None:
    """Refuse ``stage.init_from`` when its checkpoint was trained as another model (another variant or size),
    before any step, naming the fields that differ (the loader would fail later on the first tensor)."""
    from megatron.bridge.training.checkpointing import get_checkpoint_run_config_filename, read_run_config

    from nemo_pixellm.training.checkpoints import iteration_dir

    run_config = Path(get_checkpoint_run_config_filename(str(iteration_dir(init_from))))
    if not run_config.is_file():  # not written by a Bridge run: the loader names what is missing
        return
    saved = read_run_config(str(run_config)).get("model", {})
    differ = [f"{name} {saved[name]} there, {getattr(model, name)} here" for name in ARCHITECTURE
              if name in saved and hasattr(model, name) and saved[name] != getattr(model, name)]
    if differ:
        raise ConfigError(f"stage.init_from={init_from} holds another model ({'; '.join(differ)}): choose the variant "
                          "and model.* sizes it was trained with, or start without stage.init_from")


def validate_run(cfg, container) -> None:
    """Keys that only make sense together, and precision the backend can run."""
    m = container.model
    precision = str(cfg.get("mixed_precision") or "")
    if ("fp8" in precision or m.fp8) and not resolve_use_te(m.use_te):
        raise ConfigError(f"FP8 ({'mixed_precision=' + precision if precision else 'model.fp8=' + str(m.fp8)}) runs "
                          "through Transformer Engine, which this run does not use (model.use_te resolves to false: "
                          "not installed, or switched off): install the [gpu] extra / use the Dockerfile's image with "
                          "model.use_te=true, or choose mixed_precision=bf16_mixed (GPU) or null (fp32)")
    if m.attention_chunk_size or m.no_rope_freq:  # LLaMA 4's iRoPE
        key = "model.attention_chunk_size" if m.attention_chunk_size else "model.no_rope_freq"
        if m.multi_latent_attention:
            raise ConfigError(f"{key} is LLaMA 4's interleaved RoPE / NoPE attention: it needs grouped-query "
                              "attention (model.multi_latent_attention=false)")
        if m.attention_chunk_size and resolve_use_te(m.use_te):
            raise ConfigError("model.attention_chunk_size: chunked attention runs on the local backend only "
                              "(Transformer Engine has no chunked mask here): set model.use_te=false")
    if m.image_position_code and m.hidden_size <= 2 * POSITION_CODE_CHANNELS:
        raise ConfigError(f"model.image_position_code=true writes each image token's place into its last "
                          f"{POSITION_CODE_CHANNELS} channels and needs model.hidden_size above "
                          f"{2 * POSITION_CODE_CHANNELS} (it is {m.hidden_size}): set model.image_position_code=false")
    if container.ddp.use_distributed_optimizer != container.optimizer.use_distributed_optimizer:
        raise ConfigError("ddp.use_distributed_optimizer and optimizer.use_distributed_optimizer differ: set "
                          "optimizer.use_distributed_optimizer only (conf/config.yaml passes it on to ddp)")
    if container.train.exit_signal_handler and not container.checkpoint.save:
        raise ConfigError("train.exit_signal_handler=true saves a checkpoint on the exit signal: set checkpoint.save "
                          "too, or train.exit_signal_handler=false")
    if cfg.vqa_eval.interval:
        if m.pipeline_model_parallel_size > 1:
            raise ConfigError("vqa_eval.interval decodes on each rank and needs pipeline_model_parallel_size=1: set "
                              "vqa_eval.interval=null and run nemo_pixellm.evaluate on the checkpoints instead")
        if container.dataset.path is not None and container.dataset.valid_path is None:
            raise ConfigError("vqa_eval.interval asks the held-out questions of dataset.valid_path, which is unset: "
                              "set dataset.valid_path=<shards with qa lists> or vqa_eval.interval=null")
        if container.dataset.valid_path is not None:
            _check_shards(container.dataset.valid_path, "dataset.valid_path", "vqa")


def check_context_parallel(cfg, cp: int) -> None:
    """What context parallelism (models/context_parallel.py) takes: sequences cut into 2 x CP equal chunks, and
    neither packed samples (THD across CP ranks needs TE's partitioning, not wired), stage 4 (rollouts decode on
    one rank's sequence), nor chunked attention."""
    seq = cfg.model.seq_length
    if seq % (2 * cp):
        raise ConfigError(f"model.context_parallel_size={cp} cuts each sequence into {2 * cp} equal chunks: seq_length "
                          f"{seq} is not a multiple of {2 * cp}")
    if cfg.dataset.pack:
        raise ConfigError("dataset.pack=true with model.context_parallel_size > 1 is not supported yet (packed "
                          "samples across CP ranks need TE's THD partitioning): set dataset.pack=false")
    if cfg.model.attention_chunk_size:
        raise ConfigError("model.attention_chunk_size with model.context_parallel_size > 1 is not supported")


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
    if cp > 1:
        check_context_parallel(cfg, cp)
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.tensor_model_parallel_size={tp} does not divide the {m.num_attention_heads} attention heads"
        )
    if not m.multi_latent_attention:  # grouped-query attention: whole groups per TP rank
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % groups:
            raise ConfigError(f"model.num_query_groups={groups} does not divide the {m.num_attention_heads} attention "
                              "heads: each key / value head serves the same number of query heads")
        if groups % tp:
            raise ConfigError(f"model.tensor_model_parallel_size={tp} does not divide model.num_query_groups={groups}:"
                              " choose a TP size that divides the key / value heads")
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
    # the rotary width: MLA's decoupled rope slice, or a grouped-query attention head
    rope_key, rope_dim = (("qk_pos_emb_head_dim", m.qk_pos_emb_head_dim) if m.multi_latent_attention
                          else ("kv_channels", m.kv_channels or m.hidden_size // m.num_attention_heads))
    if m.mrope_section and sum(m.mrope_section) != rope_dim // 2:
        raise ConfigError(f"model.mrope_section {list(m.mrope_section)} must sum to {rope_key}/2 = {rope_dim // 2}")
    if m.mrope_interleaved:
        if not m.mrope_section:
            raise ConfigError("model.mrope_interleaved=true needs model.mrope_section (the t / h / w pair counts)")
        try:
            mrope_axis_per_column(tuple(m.mrope_section), rope_dim, sections_interleaved=True)
        except ValueError as error:
            raise ConfigError(f"model.{error}, or set model.mrope_interleaved=false") from None
    if cfg.model.seq_length != cfg.dataset.seq_length:
        raise ConfigError("model.seq_length and dataset.seq_length differ: set the top-level seq_length instead")
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
