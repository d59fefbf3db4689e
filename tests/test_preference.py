"""Stage 4 end to end: rollouts' log-probs equal the training forward's, GRPO from a stage-3 checkpoint logs
its figures, keeps the router and the reference bit-identical, resumes exactly and gives the same step on
2 processes (DP=2 with EP=2) as on one; DPO starts at ln 2 and reports held-out preference accuracy; bad
stage-4 settings are refused before anything is built. The loss formulas themselves: test_preference_losses.py."""

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from nemo_pixellm.generate import generate
from nemo_pixellm.preference.grpo import answer_logprobs
from nemo_pixellm.preference.rollouts import rollout_batch

from conftest import QUICK, TINY_LM, TINY_VISION_56, build_pixellm, compose_cfg, metrics, run_train
from test_generate import _prompts

GRPO_METRICS = ("reward", "kl", "clip_fraction", "ratio", "groups_with_signal", "answer_tokens", "entropy",
                "logprob_gap")


def test_rollout_logprobs_equal_the_training_forward(megatron_single_process):
    """Sampled answers (temperature 1, MLA latent cache, one stream per row) scored by the decoder and by the
    training forward on the laid-out rows: the same log-probs within 1e-5 (fp32)."""
    model = build_pixellm(megatron_single_process, **TINY_LM, **TINY_VISION_56, vocab_size=256, seq_length=64,
                          image_token_id=5, seed=11)
    prompts = _prompts(torch.Generator().manual_seed(4)) * 2
    seeds = [101, 102, 103, 104, 105, 106]
    scores: list[torch.Tensor] = []
    said = generate(model, prompts, eos_id=1, pad_id=0, max_new_tokens=6, temperature=1.0, seed=seeds, scores=scores)
    assert said[0] != said[3]  # same prompt, own stream: different answers
    alone = generate(model, [prompts[4]], eos_id=1, pad_id=0, max_new_tokens=6, temperature=1.0, seed=[seeds[4]])
    assert alone == [said[4]]  # a row's answer does not depend on the rows it is decoded with
    answers = [out + [1] * (len(out) < 6) for out in said]
    batch = rollout_batch(prompts, answers, 64, pad_id=0)
    with torch.no_grad():
        trained = -model(batch["tokens"], batch["position_ids"], labels=batch["labels"], images=batch["images"],
                         image_grids=batch["image_grids"])
    gaps = []
    for row, decoded in enumerate(answer_logprobs(scores, answers)):
        start = len(prompts[row].tokens) - 1
        assert batch["loss_mask"][row].sum() == len(decoded)
        gaps.append((trained[row, start:start + len(decoded)] - decoded).abs().max())
    print(f"rollout vs training forward log-prob gap: max {max(gaps):.2e}")
    assert max(gaps) <= 1e-5


def checkpoint_at(save_dir: Path, iteration: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{save_dir.parent.name}-{save_dir.name}-{iteration}.pt"
    dcp_to_torch_save(save_dir / f"iter_{iteration:07d}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def latest(save_dir: Path) -> int:
    return int((save_dir / "latest_checkpointed_iteration.txt").read_text())


# Large plain-SGD steps (as test_parallel.py): each update is lr x gradient, so equal runs mean equal gradients.
# Four questions x 4 answers per step; half the reward for ending the answer gives an untrained policy signal.
GRPO = ["+stage=stage4", *QUICK, "stage.generations=4", "train.global_batch_size=16", "train.micro_batch_size=8",
        "stage.format_reward=0.5", "stage.max_new_tokens=4", "optimizer.optimizer=sgd", "optimizer.lr=0.5",
        "optimizer.min_lr=0.5", "+optimizer.sgd_momentum=0", "optimizer.weight_decay=0", "scheduler.lr_warmup_iters=0",
        "optimizer.clip_grad=0",
        "dataset.image_size=112",
        "dataset.max_tiles=4"]


@pytest.fixture(scope="module")
def grpo_run(trained_checkpoint, cache_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    run_train([*GRPO, f"stage.init_from={trained_checkpoint}", "train.train_iters=2", "checkpoint.save_interval=1",
               f"checkpoint.save={root / 'checkpoints'}", f"run_dir={root / 'run'}"], cache_dir)
    return root


@pytest.mark.slow
def test_grpo_logs_its_figures_and_keeps_frozen_state(grpo_run, trained_checkpoint, tmp_path):
    rows = metrics(grpo_run / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        print({k: round(row[k], 6) for k in ("loss", *GRPO_METRICS)})
        assert all(math.isfinite(row[k]) for k in GRPO_METRICS)
        assert row["logprob_gap"] <= 1e-5 and row["ratio"] == pytest.approx(1.0, abs=1e-6)
        assert 0 <= row["groups_with_signal"] <= 1 and 1 <= row["answer_tokens"] <= 5 and row["entropy"] > 0
        assert len(row["samples"]) == 4  # one key per question
    # The stage-3 policy's answers differ within groups; after one lr-0.5 SGD step they may all agree.
    assert rows[0]["groups_with_signal"] > 0
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0  # the policy left the reference after the first update
    assert list((grpo_run / "run" / "tensorboard").glob("events.*"))

    before = checkpoint_at(trained_checkpoint, latest(trained_checkpoint), tmp_path)
    after = checkpoint_at(grpo_run / "checkpoints", 2, tmp_path)
    frozen = [n for n in before if "router" in n]
    assert any(n.endswith("expert_bias") for n in frozen) and any(n.endswith("router.weight") for n in frozen)
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    moved = [n for n in before if n not in frozen and not torch.equal(after[n], before[n])]
    assert len(moved) > 10  # the policy itself trained

    # The reference file holds module parameter names: compare with the stage-3 checkpoint loaded by Bridge.
    from nemo_pixellm.evaluate import load

    stage3 = dict(load(str(trained_checkpoint))[0].named_parameters())
    reference = torch.load(grpo_run / "checkpoints" / "reference" / "rank00000.pt", weights_only=True)
    assert len(reference) == len(stage3) - sum("router" in n for n in stage3) > 50  # every trainable tensor
    for name, tensor in reference.items():
        assert torch.equal(tensor, stage3[name]), name  # the stage-3 weights, bit for bit


@pytest.mark.slow
def test_grpo_resumes_exactly(grpo_run, trained_checkpoint, cache_dir, tmp_path):
    """Step 2 again from the step-1 checkpoint: the same questions, answers (sampling streams are a function
    of seed and group), reference and update. Plain SGD has no optimizer state, and Megatron cannot reload
    its (empty) one, so the resume skips it; optimizer-state resume is test_reliability.py's."""
    run_train([*GRPO, f"stage.init_from={trained_checkpoint}", "train.train_iters=2",
               f"checkpoint.load={grpo_run / 'checkpoints'}", "+checkpoint.ckpt_step=1", "+checkpoint.load_optim=false",
               f"checkpoint.save={tmp_path / 'checkpoints'}", f"run_dir={tmp_path / 'run'}"], cache_dir)
    resumed, straight = metrics(tmp_path / "run"), metrics(grpo_run / "run")
    assert [r["step"] for r in resumed] == [2]
    for key in ("loss", "samples", *GRPO_METRICS):
        assert resumed[0][key] == straight[1][key], key
    ours, theirs = checkpoint_at(tmp_path / "checkpoints", 2, tmp_path), checkpoint_at(grpo_run / "checkpoints", 2, tmp_path)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_grpo_updates_per_rollout_sample_with_the_cycle_s_first_weights(trained_checkpoint, cache_dir, tmp_path):
    """stage.updates_per_rollout=2: step 2 samples with step 1's starting weights (pi_old, saved with the step-1
    checkpoint, which lies inside the cycle), so its ratio leaves 1 while pi_old's training log-probs still equal
    the sampler's; a resume from step 1 continues the cycle bit-exactly."""
    straight = tmp_path / "straight"
    run_train([*GRPO, f"stage.init_from={trained_checkpoint}", "train.train_iters=2", "checkpoint.save_interval=1",
               "stage.updates_per_rollout=2", f"checkpoint.save={straight / 'checkpoints'}",
               f"run_dir={straight / 'run'}"], cache_dir)
    rows = metrics(straight / "run")
    print({k: [r[k] for r in rows] for k in ("ratio", "clip_fraction", "kl", "logprob_gap")})
    assert rows[0]["ratio"] == 1.0 and rows[0]["clip_fraction"] == 0.0  # the policy is pi_old
    assert abs(rows[1]["ratio"] - 1.0) > 1e-3 and rows[1]["logprob_gap"] <= 1e-5  # pi_old sampled step 2
    saved = torch.load(straight / "checkpoints" / "iter_0000001" / "rollout_policy_rank00000.pt", weights_only=True)
    reference = torch.load(straight / "checkpoints" / "reference" / "rank00000.pt", weights_only=True)
    assert set(saved) == set(reference) and all(torch.equal(saved[n], reference[n]) for n in saved)  # first cycle
    assert not (straight / "checkpoints" / "iter_0000002" / "rollout_policy_rank00000.pt").exists()  # a cycle ends

    run_train([*GRPO, f"stage.init_from={trained_checkpoint}", "train.train_iters=2", "stage.updates_per_rollout=2",
               f"checkpoint.load={straight / 'checkpoints'}", "+checkpoint.ckpt_step=1", "+checkpoint.load_optim=false",
               f"checkpoint.save={tmp_path / 'checkpoints'}", f"run_dir={tmp_path / 'run'}"], cache_dir)
    resumed = metrics(tmp_path / "run")
    for key in ("loss", "samples", *GRPO_METRICS):
        assert resumed[0][key] == rows[1][key], key
    ours, theirs = checkpoint_at(tmp_path / "checkpoints", 2, tmp_path), checkpoint_at(straight / "checkpoints", 2, tmp_path)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_grpo_step_on_two_processes_equals_one(grpo_run, trained_checkpoint, cache_dir, tmp_path):
    """DP=2 with EP=2: each rank samples half of the questions (the experts split between the ranks); the
    step's figures and the updated weights equal the 1-process step."""
    run_train([*GRPO, f"stage.init_from={trained_checkpoint}", "train.train_iters=1",
               "model.expert_model_parallel_size=2", f"checkpoint.save={tmp_path / 'checkpoints'}",
               f"run_dir={tmp_path / 'run'}"], cache_dir, nproc=2)
    two, one = metrics(tmp_path / "run")[0], metrics(grpo_run / "run")[0]
    print(f"1 process: loss {one['loss']:.6g} reward {one['reward']:.4g} | 2 processes: loss {two['loss']:.6g} "
          f"reward {two['reward']:.4g}")
    assert abs(one["loss"]) > 1e-3  # the step has a gradient
    assert sorted(two["samples"]) == sorted(one["samples"])
    for key in ("loss", *GRPO_METRICS):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    single, parallel = checkpoint_at(grpo_run / "checkpoints", 1, tmp_path), checkpoint_at(tmp_path / "checkpoints", 1, tmp_path)
    assert set(single) == set(parallel)
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_grpo_raises_the_reward_it_is_trained_on(trained_checkpoint, cache_dir, tmp_path):
    """The update points the right way: rewarded only for ending its answer within 2 tokens (the format term),
    on the same 4 questions step after step, the policy's mean reward climbs (Adam, 10 steps)."""
    run_train(["+stage=stage4", *QUICK, f"stage.init_from={trained_checkpoint}", "dataset.image_size=112",
               "dataset.max_tiles=4", "dataset.synthetic_prompt_samples=4", "stage.generations=8",
               "train.global_batch_size=32", "train.micro_batch_size=32", "stage.format_reward=1.0",
               "stage.max_new_tokens=2", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "scheduler.lr_warmup_iters=0",
               "train.train_iters=10", f"run_dir={tmp_path / 'run'}"], cache_dir)
    rewards = [row["reward"] for row in metrics(tmp_path / "run")]
    print("reward per step:", [round(r, 3) for r in rewards])
    assert sum(rewards[-3:]) / 3 >= sum(rewards[:3]) / 3 + 0.3


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_reports_heldout_accuracy(trained_checkpoint, cache_dir, tmp_path):
    # Pairs on one image: step 2 asks step 1's questions again (other wrong answers), so its loss shows the update.
    proc = run_train(["+stage=stage4", "stage.algorithm=dpo", "logger.log_interval=1", "dataset.num_workers=0",
                      "dataset.synthetic_prompt_samples=1", "dataset.image_size=112", "dataset.max_tiles=4",
                      f"stage.init_from={trained_checkpoint}",
                      "train.train_iters=2", "train.global_batch_size=8", "train.micro_batch_size=8",
                      "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "scheduler.lr_warmup_iters=0",
                      "validation.eval_interval=2", "validation.eval_iters=1",
                      f"checkpoint.save={tmp_path / 'checkpoints'}", f"run_dir={tmp_path / 'run'}"], cache_dir)
    rows = metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert rows[0]["reward_margin"] == 0 and rows[0]["preference_accuracy"] == 0
    assert rows[1]["loss"] < math.log(2)
    assert "validation loss at iteration 2" in proc.stdout and "preference_accuracy value" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    ([], "set stage.init_from=<the stage-3 checkpoint.save directory>"),
    (["stage.algorithm=ppo", "stage.init_from={ckpt}"], "stage.algorithm=ppo: choose one of grpo, dpo"),
    (["stage.generations=1", "stage.init_from={ckpt}"], "stage.generations=1: GRPO compares answers"),
    (["stage.generations=3", "stage.init_from={ckpt}"], "train.global_batch_size=32 .* multiple of stage.generations=3"),
    (["model.pipeline_model_parallel_size=2", "stage.init_from={ckpt}"], "pipeline_model_parallel_size=1"),
    (["model.calculate_per_token_loss=false", "stage.init_from={ckpt}"], "calculate_per_token_loss=true"),
    (["stage.updates_per_rollout=0", "stage.init_from={ckpt}"], "stage.updates_per_rollout=0: give the optimizer steps"),
    (["+model.moe_input_jitter_eps=0.01", "stage.init_from={ckpt}"], "model.moe_input_jitter_eps=0.01: the jitter would "
     "make the training forward's log-probs differ"),
    (["stage.question_types=position", "stage.init_from={ckpt}"], "stage.question_types=position: give a list"),
    (["stage.algorithm=dpo", "stage.sft_weight=-1", "stage.init_from={ckpt}"], "stage.sft_weight=-1: give the chosen"),
])
def test_bad_stage4_settings_are_refused(overrides, message, cache_dir, tmp_path, monkeypatch):
    from nemo_pixellm.training.config import build_config
    from nemo_pixellm.training.validate import ConfigError

    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))
    checkpoint = tmp_path / "checkpoints"  # what config time checks of a checkpoint.save directory
    checkpoint.mkdir()
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("1")
    cfg = compose_cfg(["+stage=stage4", *(o.format(ckpt=checkpoint) for o in overrides)])
    with pytest.raises(ConfigError, match=message):
        build_config(cfg, world_size=1)


def test_grpo_asks_only_the_question_types_it_is_given(cache_dir, tmp_path):
    """stage.question_types draws each group's question among the record's questions of those types (the same
    draw on every call: resume and layouts see the same prompts); a type no record asks is named."""
    from nemo_pixellm.data.provider import PixelLMDataConfig
    from nemo_pixellm.data.samples import ShardSamples
    from nemo_pixellm.data.shards import BadRecord
    from nemo_pixellm.data.sources import data_paths, ensure_tokenizer
    from nemo_pixellm.preference.rollouts import PromptGroups

    config = PixelLMDataConfig(cache_dir=str(cache_dir), image_size=56, synthetic_train_samples=64,
                               synthetic_valid_samples=8, seq_length=128)
    train, _ = data_paths(config)
    tokenizer = ensure_tokenizer(cache_dir, 512, 1234)
    questions = ShardSamples(train, tokenizer, "vqa", config.patch_size, config.downsample, config.max_tiles)

    def groups(types):
        return PromptGroups(questions, 4, 64, 56, 128, seed=3, question_types=types)

    everything = [groups(None).draw(g) for g in range(40)]
    assert len({g.kind for g in everything}) >= 3
    focused = groups(["position", "colour"])
    drawn = [focused.draw(g) for g in range(40)]
    assert {g.kind for g in drawn} == {"position", "colour"}
    records = {questions.reader[i]["__key__"]: questions.meta(i)["qa"] for i in range(len(questions))}
    for group in drawn:  # the prompt asks a question of that record whose answer is the reward
        prompt = tokenizer.decode(group.prompt.tokens)
        assert any(qa["q"] in prompt and qa["a"] == group.answer and qa["type"] == group.kind
                   for qa in records[group.key])
    assert [(g.key, g.answer) for g in drawn] == [(g.key, g.answer) for g in map(focused.draw, range(40))]
    with pytest.raises(BadRecord, match=r"no question of stage.question_types=\['poem'\]; its records ask .*position"):
        groups(["poem"]).draw(0)


def test_stage4_asks_about_scenes_no_earlier_stage_trained_on(cache_dir):
    """On the synthetic set GRPO's questions and DPO's pairs come from a split of their own (seed + 3), not the
    training split."""
    from nemo_pixellm.data import sources
    from nemo_pixellm.data.provider import PixelLMDataConfig

    config = PixelLMDataConfig(cache_dir=str(cache_dir), image_size=56, synthetic_train_samples=64,
                               synthetic_valid_samples=8, synthetic_prompt_samples=16, seq_length=128, generations=4)
    tokenizer = sources.ensure_tokenizer(cache_dir, 512, config.seed)
    groups = sources.train_dataset(config, tokenizer, 32)
    reader = groups.questions.reader
    prompt_keys = {reader[i]["__key__"] for i in range(len(reader))}
    assert len(prompt_keys) == 16 and all(k.startswith(f"{config.seed + 3:04d}_") for k in prompt_keys)
    assert {groups.draw(g).key for g in range(8)} <= prompt_keys
    config.generations, config.task = 0, "preference"
    pairs = sources.train_dataset(config, tokenizer, 32)
    pair_images = {bytes(pairs.records.reader[i]["jpg"]) for i in range(len(pairs.records))}
    assert len(pair_images) == 16 and pair_images == {bytes(reader[i]["jpg"]) for i in range(len(reader))}


def test_malformed_preference_records_are_skipped_and_counted(cache_dir, tmp_path):
    """A pair whose record lacks its rejected answer, or whose JSON is broken, is skipped for the next one and
    reported with the pair; a shard set of such records is refused at config time."""
    import json

    from nemo_pixellm.data.samples import ShardSamples
    from nemo_pixellm.data.shards import write_shards
    from nemo_pixellm.data.sources import ensure_tokenizer
    from nemo_pixellm.preference.dpo import PreferencePairs

    good = {"question": "What colour is the sky?", "chosen": "blue", "rejected": "green"}
    records = [{"__key__": "bad_json", "json": b"{"},
               {"__key__": "no_rejected", "json": json.dumps({"question": "q", "chosen": "a"}).encode()},
               {"__key__": "good", "json": json.dumps(good).encode()}]
    write_shards(records, tmp_path / "pairs", shard_size=10)
    tokenizer = ensure_tokenizer(cache_dir, 512, 1234)
    pairs = PreferencePairs(ShardSamples(tmp_path / "pairs", tokenizer, "preference"), 9, 56, 64, seed=0)
    reasons = []
    for i in range(3):
        item = pairs[i]
        reasons += [r["reason"] for r in item["skipped"]]
        assert (item["chosen"]["tokens"] != item["rejected"]["tokens"]).any()
    assert any("malformed record" in r for r in reasons)
    assert any("chosen, rejected" in r for r in reasons)


def test_rejected_answer_is_the_model_s_mistake_else_a_distractor():
    import random

    from nemo_pixellm.preference.pairs import rejected_answer

    qa = {"type": "colour", "q": "What colour is the circle?", "a": "red"}
    assert rejected_answer([" blue "], qa, random.Random(0)) == ("blue", "model")
    # Several sampled answers: the most frequent wrong one, the first of equal counts.
    assert rejected_answer(["red", "green", "blue", "blue", "red", "red"], qa, random.Random(0)) == ("blue", "model")
    assert rejected_answer(["green", "red", "blue"], qa, random.Random(0)) == ("green", "model")
    for right_or_empty in (["red"], [" Red."], [""], ["red", "", " red"]):  # right (after VQA normalisation) or
        rejected, source = rejected_answer(right_or_empty, qa, random.Random(0))  # none: a distractor
        assert source == "distractor" and rejected != "red" and rejected in ("blue", "green", "yellow", "purple",
                                                                              "orange", "white", "black", "grey")


@pytest.mark.parametrize("answers, temperature", [(0, 1.0), (4, 0.0)])
def test_pairs_refuse_answers_that_cannot_differ(answers, temperature, tmp_path, capsys):
    from nemo_pixellm.preference.pairs import main

    with pytest.raises(SystemExit):
        main([f"checkpoint={tmp_path}", f"out={tmp_path / 'pairs'}", f"answers={answers}", f"temperature={temperature}"])
    assert f"answers={answers} with temperature={temperature}" in capsys.readouterr().err
    assert not (tmp_path / "pairs").exists()


@pytest.mark.slow
def test_dpo_pairs_from_the_model_s_own_answers(trained_checkpoint, cache_dir, tmp_path, monkeypatch):
    """python -m nemo_pixellm.preference.pairs: for the questions of the checkpoint's stage-4 split (the default),
    each pair's rejected answer is the stage-3 model's greedy answer to that question (decoded again here without
    the cache) when wrong; the shards pass stage 4's data check and read back as pairs whose answer tokens are the
    chosen and rejected answers."""
    import json

    from nemo_pixellm.data import sources
    from nemo_pixellm.data.samples import ShardSamples
    from nemo_pixellm.data.shards import ShardReader
    from nemo_pixellm.evaluate import load
    from nemo_pixellm.generate import prompt_from_sample
    from nemo_pixellm.preference.pairs import PairArgs, build_pairs, main
    from nemo_pixellm.training.config import build_config

    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))
    summary = build_pairs(PairArgs(checkpoint=str(trained_checkpoint), out=str(tmp_path / "pairs"), samples=3))
    print(summary)
    model, data_config, _ = load(str(trained_checkpoint))
    tokenizer = sources.load_tokenizer(data_config)
    split = ShardSamples(sources.stage4_path(data_config), tokenizer, "vqa", max_tiles=data_config.max_tiles)
    reader = ShardReader(tmp_path / "pairs")
    metas = [json.loads(reader[i]["json"]) for i in range(len(reader))]
    asked = [(r, q) for r in range(3) for q in range(len(json.loads(split.reader[r]["json"])["qa"]))]
    assert len(metas) == len(asked) == summary["pairs"]
    assert summary["rejected_from_model"] + summary["rejected_from_distractor"] == summary["pairs"]
    assert summary["rejected_from_model"] > 0
    for meta, (record, number), i in zip(metas, asked, range(len(metas))):
        sample = split.sample(number * len(split) + record, data_config.image_size, data_config.seq_length)
        said = tokenizer.decode(generate(model, [prompt_from_sample(sample)], tokenizer.eos_id, tokenizer.pad_id,
                                         max_new_tokens=6, use_cache=False)[0]).strip()
        qa = json.loads(split.reader[record]["json"])["qa"][number]
        assert (meta["question"], meta["chosen"], meta["type"]) == (qa["q"], qa["a"], qa["type"])
        assert meta["rejected"] == said if meta["rejected_from"] == "model" else said in ("", qa["a"])
        assert reader[i]["jpg"] == split.reader[record]["jpg"]
    cfg = compose_cfg(["+stage=stage4", "stage.algorithm=dpo", f"stage.init_from={trained_checkpoint}",
                       f"dataset.path={tmp_path / 'pairs'}", "dataset.image_size=112", "dataset.max_tiles=4"])
    assert build_config(cfg, world_size=1).dataset.task == "preference"
    pairs = ShardSamples(tmp_path / "pairs", tokenizer, "preference", max_tiles=4)
    chosen, rejected = pairs.pair(0, 112, 128, rng=None)
    answer = lambda s: tokenizer.decode(s.segments[-1].ids[:-1]).strip()  # noqa: E731 (without the end token)
    assert (answer(chosen), answer(rejected)) == (metas[0]["chosen"], metas[0]["rejected"])
    with pytest.raises(SystemExit):  # an output directory that holds something is left alone
        main([f"checkpoint={trained_checkpoint}", f"out={tmp_path / 'pairs'}"])
    assert len(ShardReader(tmp_path / "pairs")) == len(metas)
    # answers=3 at a near-zero temperature: three greedy answers per question, grouped back to their question,
    # give the same pairs as one greedy answer.
    build_pairs(PairArgs(checkpoint=str(trained_checkpoint), out=str(tmp_path / "pairs3"), samples=3, answers=3,
                         temperature=1e-4))
    reader3 = ShardReader(tmp_path / "pairs3")
    assert [json.loads(reader3[i]["json"]) for i in range(len(reader3))] == metas
    # evaluate asks questions: pairs as its data (a DPO run's held-out split) are refused naming the way out
    from nemo_pixellm.evaluate import NoQuestions, question_jobs
    with pytest.raises(NoQuestions, match='record 0 has no "qa" questions .*give data=<VQA shards>'):
        question_jobs(ShardSamples(tmp_path / "pairs", tokenizer, "vqa", max_tiles=4), 3, "data=pairs")
