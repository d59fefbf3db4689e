"""Config composition and the errors a user gets before any training starts."""

import pytest
import torch

from nemo_pixellm.training.config import build_config
from nemo_pixellm.training.validate import ConfigError

from conftest import compose_cfg, run_train


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))


# reference.md section 1: hidden, layers, heads, q_lora, kv_lora, routed expert FFN, shared FFN.
REFERENCE_VARIANTS = {
    "pixel": (1024, 8, 8, 512, 128, 832, 2048),
    "megapixel": (2048, 16, 16, 1024, 256, 928, 4096),
    "gigapixel": (4096, 32, 32, 2048, 512, 1440, 8192),
}


@pytest.mark.parametrize("variant", sorted(REFERENCE_VARIANTS))
def test_real_variants_match_reference(variant):
    m = compose_cfg(["+stage=stage2", f"variant={variant}"]).model
    got = (m.hidden_size, m.num_layers, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank,
           m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size)
    assert got == REFERENCE_VARIANTS[variant]
    assert (m.vocab_size, m.num_moe_experts, m.moe_router_topk) == (102400, 288, 8)
    assert (m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (64, 64, 128)
    assert m.moe_layer_freq == 1
    assert list(m.mrope_section) == [8, 12, 12]  # reference.md: the 32 rope pairs split t / h / w


def test_stage_trainable_sets_and_lrs():
    expected = {"stage1": ["projector"], "stage1_5": ["vision_model", "projector"], "stage2": None, "stage3": None}
    for stage, trainable in expected.items():
        cfg = compose_cfg([f"+stage={stage}", "variant=pixel"])
        assert (list(cfg.stage.trainable) if cfg.stage.trainable is not None else None) == trainable
    # The real variants take the published recipe LRs as they are (lr_scale 1).
    assert compose_cfg(["+stage=stage2", "variant=pixel"]).optimizer.lr == pytest.approx(2e-5)
    assert compose_cfg(["+stage=stage1_5", "variant=gigapixel"]).optimizer.lr == pytest.approx(1e-5)


def test_tiny_default_builds_a_bridge_container():
    container = build_config(compose_cfg(["+stage=stage2"]), world_size=1)
    assert type(container.model).__name__ == "PixelLMProvider"
    assert container.model.vocab_size % 256 == 0 and container.model.image_token_id >= 0
    assert container.dist.distributed_backend == "gloo"
    assert container.dataset.task == "caption"


def test_data_workers_follow_the_device(monkeypatch):
    """dataset.num_workers=null: none on CPUs (a worker would only take cores from the step), 2 on GPUs; a
    number given is kept."""
    assert build_config(compose_cfg(["+stage=stage2"]), world_size=1).dataset.num_workers == 0
    assert build_config(compose_cfg(["+stage=stage2", "dataset.num_workers=3"]), world_size=1).dataset.num_workers == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = build_config(compose_cfg(["+stage=stage2"]), world_size=1)
    assert (on_gpu.dataset.num_workers, on_gpu.dist.distributed_backend) == (2, "nccl")


def test_a_run_names_the_synthetic_bpe_it_learned(cache_dir, monkeypatch):
    """The saved config names the exact BPE file, so a checkpoint keeps its tokenizer after the generator's next
    version trains another one (before, a checkpoint silently decoded with the newer BPE)."""
    from nemo_pixellm.data import sources

    container = build_config(compose_cfg(["+stage=stage3"]), world_size=1)
    data = container.dataset
    trained_with = sources.load_tokenizer(data)
    assert data.tokenizer_path == str(sources.synthetic_tokenizer_file(cache_dir, data.tokenizer_vocab_size,
                                                                       data.seed).absolute())
    monkeypatch.setattr(sources, "SYNTHETIC_VERSION", sources.SYNTHETIC_VERSION + 1000)
    monkeypatch.setattr(sources, "OCR_WORD_WEIGHT", 0)  # the next version's BPE is another one
    assert sources.load_tokenizer(data).tok.to_str() == trained_with.tok.to_str()
    data.tokenizer_path = None  # what an unpinned config did: the newer BPE, silently
    assert sources.load_tokenizer(data).tok.to_str() != trained_with.tok.to_str()


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["+train.foo=1"], 1, "unknown config key 'train.foo'"),
        (["+optimizer.learning_rate=1"], 1, "unknown config key 'optimizer.learning_rate'"),
        (["model.tensor_model_parallel_size=3"], 3, "does not divide the 4 attention heads"),
        (["model.pipeline_model_parallel_size=3"], 3, "does not divide the 2 layers"),
        (["model.expert_model_parallel_size=3"], 3, "does not divide the 8 experts"),
        (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"], 3, "world size 3 is not divisible"),
        (["model.tensor_model_parallel_size=2"], 2, "needs model.sequence_parallel=true"),
        (["train.global_batch_size=6"], 4, "not a multiple of micro_batch_size*data_parallel"),
        (["stage.init_from=/nonexistent/ckpt"], 1, "stage.init_from=/nonexistent/ckpt does not exist"),
        (["model.mrope_section=[2,2,2]"], 1, "must sum to qk_pos_emb_head_dim/2 = 8"),
        (["model.mrope_interleaved=true"], 1, "cannot be interleaved over 8 frequency pairs"),
        (["model.context_parallel_size=2", "seq_length=126"], 2, "seq_length 126 is not a multiple of 4"),
        (["model.context_parallel_size=2", "dataset.pack=true"], 2, "dataset.pack=true with model.context_parallel"),
        (["progressive_resolution=[[0.2,224],[0.5,384]]"], 1, "fractions rising from 0.0"),
        (["progressive_resolution=[[0.0,224],[0.5,512]]"], 1, "a 512px view takes 342 positions: seq_length=128"),
    ],
)
def test_config_errors_name_the_fix(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        build_config(compose_cfg(["+stage=stage2", *overrides]), world_size=world_size)


def test_missing_stage():
    with pytest.raises(ConfigError, match=r"no stage selected: add \+stage="):
        build_config(compose_cfg([]), world_size=1)


def write_bad_config_dirs(root):
    """Caption shards, text-only shards, a directory without a tokenizer and an empty directory."""
    from nemo_pixellm.data.sources import text_record
    from nemo_pixellm.data.shards import write_shards
    from nemo_pixellm.data.synthetic import scene_record

    write_shards((scene_record(3, i, 56) for i in range(4)), root / "captions", shard_size=2)
    write_shards((text_record(3, i) for i in range(4)), root / "text", shard_size=2)
    (root / "tok").mkdir()
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return write_bad_config_dirs(tmp_path_factory.mktemp("bad-config"))


# Every error build_config raises before a model or process group exists (the table of issue 19): overrides
# (with {d} the data directories above) and the message. launch --dry-run builds the same config.
BAD_CONFIGS = [
    (["dataset.path={d}/none"], "no manifest.json in .*none: point dataset.path at a directory written by data_prep"),
    (["dataset.path={d}/captions", "dataset.text_ratio=0.3"], r"dataset.text_ratio=0.3 mixes in text-only shards: "
     "set dataset.text_path"),
    (["dataset.path={d}/captions", "dataset.text_path={d}/empty"], "no manifest.json in .*empty: point "
     "dataset.text_path"),
    (["dataset.path={d}/captions", "dataset.text_path={d}/captions"], "dataset.text_path=.*captions does not hold "
     "dataset.task=text records"),
    (["dataset.path={d}/captions", "dataset.text_ratio=0", "dataset.valid_path={d}/none"], "point dataset.valid_path"),
    (["dataset.path={d}/text", "dataset.text_ratio=0"], "dataset.path=.*text does not hold dataset.task=caption "
     "records .*the record has \\['text'\\]"),
    (["dataset.tokenizer_path={d}/tok"], "dataset.tokenizer_path=.*tok holds no tokenizer.json"),
    (["dataset.task=text"], "dataset.task=text trains on text-only records, which the synthetic set does not have"),
    (["dataset.task=captions"], "dataset.task=captions: choose one of caption, vqa, chat, text"),
    (["dataset.valid_path={d}/captions"], "dataset.valid_path is used with dataset.path only"),
    (["dataset.text_ratio=1.5"], r"dataset.text_ratio=1.5: give the text-only share of tokens in \[0, 1\)"),
    (["dataset.max_bad_fraction=1"], "dataset.max_bad_fraction=1: give a share in"),
    (["dataset.chat_ratio=1"], r"dataset.chat_ratio=1: give the conversations' share of the vision-language "
     r"tokens in \[0, 1\)"),
    (["dataset.task=chat", "dataset.chat_ratio=0.3"], "dataset.task=chat has none to mix: set dataset.chat_ratio=0"),
    (["dataset.synthetic_kind_shares=[0.5,0.5]"], r"dataset.synthetic_kind_shares=\[0.5, 0.5\]: give 3 non-negative "
     "shares of scene / ocr / chart with a positive sum"),
    (["dataset.path={d}/captions", "dataset.synthetic_kind_shares=[0.4,0.4,0.2]"], "dataset.synthetic_kind_shares "
     "sets the synthetic set's mix; with dataset.path the shards' own mix is used"),
    (["+model.vision_patch_size=16"], "model.vision_patch_size is set from dataset.patch_size"),
    (["+model.image_token_id=3"], "model.image_token_id is set from the tokenizer"),
    (["mixed_precision=bf16_with_fp8_delayed_scaling_mixed", "model.use_te=false"], "FP8 .* runs through "
     "Transformer Engine, which this run does not use"),
    (["+model.fp8=hybrid", "model.use_te=false"], r"FP8 \(model.fp8=hybrid\)"),
    (["ddp.use_distributed_optimizer=true"], "ddp.use_distributed_optimizer and optimizer.use_distributed_optimizer "
     "differ"),
    (["train.exit_signal_handler=true"], "train.exit_signal_handler=true saves a checkpoint on the exit signal: set "
     "checkpoint.save"),
    (["vqa_eval.interval=10", "model.pipeline_model_parallel_size=2"], "vqa_eval.interval decodes on each rank"),
    (["vqa_eval.interval=10", "dataset.path={d}/captions", "dataset.text_ratio=0"], "vqa_eval.interval asks the held-out questions of "
     "dataset.valid_path, which is unset"),
    (["stage.init_from={d}/empty"], "stage.init_from=.*empty is not a checkpoint directory"),
    (["model.multi_latent_attention=false", "model.num_query_groups=3"], "model.num_query_groups=3 does not "
     "divide the 4 attention heads"),
    (["+model.attention_chunk_size=16"], "model.attention_chunk_size is LLaMA 4's interleaved RoPE / NoPE attention: "
     "it needs grouped-query attention"),
    (["model.multi_latent_attention=false", "+model.no_rope_freq=3"], r"model.no_rope_freq=3 \(one layer in 3 without "
     r"RoPE\) does not divide the 2 layers"),
    (["stage.trainable=[projector,vision]"], r"stage.trainable names \['vision'\]: choose from vision_model"),
    (["model.image_position_code=true", "model.hidden_size=32"], "model.image_position_code=true writes each image "
     r"token's place into its last 16 channels and needs model.hidden_size above 32 \(it is 32\)"),
    (["checkpoint.load={d}/none"], "checkpoint.load=.*none does not exist: give a checkpoint.save directory"),
    (["model.language_pretrained_path={d}/empty"], r"model.language_pretrained_path=.*empty is not a Hugging Face "
     r"DeepseekV3ForCausalLM / LlamaForCausalLM directory \(no config.json there\)"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[o[0] for o, _ in BAD_CONFIGS])
def test_bad_configs_fail_in_build_config(data_dirs, overrides, message):
    world = 2 if any("pipeline" in o for o in overrides) else 1
    cfg = compose_cfg(["+stage=stage2", *(o.format(d=data_dirs) for o in overrides)])
    with pytest.raises(ConfigError, match=message):
        build_config(cfg, world_size=world)


def test_good_shard_config_passes(data_dirs):
    container = build_config(compose_cfg(["+stage=stage2", f"dataset.path={data_dirs}/captions",
                                          f"dataset.text_path={data_dirs}/text"]), world_size=1)
    assert container.dataset.text_path.endswith("text") and container.model.vision_patch_size == 14
    patched = build_config(compose_cfg(["+stage=stage2", "dataset.patch_size=16", "seq_length=256"]), world_size=1)
    assert patched.model.vision_patch_size == 16  # the data's patch size is the tower's


def test_aux_loss_router_preset():
    """+router=aux_loss (the Switch / Mixtral router, checked against transformers in test_router.py) composes
    over any variant and builds."""
    for variant in ("tiny", "pixel"):
        model = build_config(compose_cfg(["+stage=stage2", f"variant={variant}", "+router=aux_loss"]),
                             world_size=1).model
        assert (model.moe_router_score_function, model.moe_router_load_balancing_type, model.moe_aux_loss_coeff,
                model.moe_router_enable_expert_bias, model.moe_router_pre_softmax) == ("softmax", "aux_loss", 0.02,
                                                                                      False, False)


def test_cli_rejects_bad_config_before_training(cache_dir, tmp_path):
    bad_key = run_train(["+stage=stage2", "+train.lr=1", f"run_dir={tmp_path}"], cache_dir, check=False, timeout=300)
    assert bad_key.returncode == 2
    assert "unknown config key 'train.lr'" in bad_key.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    bad_variant = run_train(["+stage=stage2", "variant=kilopixel"], cache_dir, check=False, timeout=300)
    assert bad_variant.returncode != 0
    assert "variant/kilopixel" in bad_variant.stderr  # Hydra lists the available variants


@pytest.mark.slow
def test_init_from_a_checkpoint_of_another_model_is_refused(trained_checkpoint):
    """stage.init_from of a checkpoint trained as another model (here: a wider tiny) is refused before any step,
    naming what differs; the model it was trained as passes."""
    same = ["+stage=stage3", f"stage.init_from={trained_checkpoint}", "dataset.image_size=112", "dataset.max_tiles=4"]
    assert build_config(compose_cfg(same), world_size=1).checkpoint.pretrained_checkpoint == str(trained_checkpoint)
    with pytest.raises(ConfigError, match=r"stage.init_from=.* holds another model \(hidden_size 64 there, 128 here; "
                                          r"num_layers 2 there, 3 here\): choose the variant"):
        build_config(compose_cfg([*same, "model.hidden_size=128", "model.num_layers=3"]), world_size=1)
