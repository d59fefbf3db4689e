"""Config composition and the errors a user gets before any training starts."""

import pytest
from hydra import compose, initialize_config_dir

from nemo_pixellm.training.config import CONF_DIR, build_config
from nemo_pixellm.training.validate import ConfigError

from conftest import run_train


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


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
        (["dataset.pack=true", "model.use_te=true"], 1, "dataset.pack=true isolates packed samples"),
        (["progressive_resolution=[[0.2,224],[0.5,384]]"], 1, "fractions rising from 0.0"),
        (["progressive_resolution=[[0.0,224],[0.5,512]]"], 1, "a 512px view takes 342 positions: seq_length=128"),
    ],
)
def test_config_errors_name_the_fix(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        build_config(compose_cfg(["+stage=stage2", *overrides]), world_size=world_size)


def test_missing_stage_and_stage4():
    with pytest.raises(ConfigError, match=r"no stage selected: add \+stage="):
        build_config(compose_cfg([]), world_size=1)
    with pytest.raises(NotImplementedError, match="stage4 .* not implemented"):
        build_config(compose_cfg(["+stage=stage4"]), world_size=1)


def test_missing_data_path(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        build_config(compose_cfg(["+stage=stage2", "data=shards", f"dataset.path={tmp_path}/none",
                                  f"dataset.tokenizer_path={tok}"]), world_size=1)
    cfg = compose_cfg(["+stage=stage2", "data=synthetic", f"dataset.path={tmp_path}/none"])
    container = build_config(cfg, world_size=1)
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*none: point data.path"):
        container.dataset.resolve_paths()


def test_cli_rejects_bad_config_before_training(cache_dir, tmp_path):
    bad_key = run_train(["+stage=stage2", "+train.lr=1", f"run_dir={tmp_path}"], cache_dir, check=False, timeout=300)
    assert bad_key.returncode == 2
    assert "unknown config key 'train.lr'" in bad_key.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    bad_variant = run_train(["+stage=stage2", "variant=kilopixel"], cache_dir, check=False, timeout=300)
    assert bad_variant.returncode != 0
    assert "variant/kilopixel" in bad_variant.stderr  # Hydra lists the available variants
