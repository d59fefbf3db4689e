"""Stage 4, preference optimisation, on Megatron-Bridge's loop like every other stage: ``stage.algorithm``
grpo (rollouts scored by exact match, grpo.py) or dpo (preference pairs, dpo.py), both against the frozen
stage-3 policy (reference.py), their objectives in losses.py. ``stage4_step`` gives ``train`` the forward
step and callbacks; ``check_stage4`` refuses what cannot run, before anything is built.
"""

ALGORITHMS = ("grpo", "dpo")
DEFAULT_BETA = {"grpo": 0.01, "dpo": 0.1}  # NeMo-RL's GRPO KL coefficient; TRL's DPO beta


def beta(stage) -> float:
    return float(stage.beta) if stage.get("beta") is not None else DEFAULT_BETA[stage.algorithm]


def check_stage4(stage, train, model, data, init_from_pending: bool = False) -> None:
    """ConfigError naming the key to change; sets the dataset fields the algorithm reads. ``init_from_pending``:
    a chain's previous stage provides stage.init_from when it has run."""
    from nemo_pixellm.training.validate import ConfigError

    algorithm = stage.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"stage.algorithm={algorithm}: choose one of {', '.join(ALGORITHMS)}")
    if not stage.get("init_from") and not init_from_pending:
        raise ConfigError("stage4 starts from a trained policy, which is also its reference: set "
                          "stage.init_from=<the stage-3 checkpoint.save directory>")
    if model.pipeline_model_parallel_size > 1 or model.context_parallel_size > 1:
        raise ConfigError("stage4 runs rollouts and reference passes inside the forward step, which needs "
                          "model.pipeline_model_parallel_size=1 and model.context_parallel_size=1 (tensor, expert "
                          "and data parallel are fine)")
    if not model.calculate_per_token_loss:
        raise ConfigError("stage4 averages its loss over the whole global batch: keep "
                          "model.calculate_per_token_loss=true (conf/stage/stage4.yaml)")
    if algorithm == "grpo":
        generations = int(stage.generations)
        if generations < 2:
            raise ConfigError(f"stage.generations={generations}: GRPO compares answers to the same prompt; give 2 or "
                              "more (8 is the default)")
        for key in ("global_batch_size", "micro_batch_size"):
            if getattr(train, key) % generations:
                raise ConfigError(f"train.{key}={getattr(train, key)} counts answers and must hold whole prompt "
                                  f"groups: make it a multiple of stage.generations={generations}")
        if not 0 <= float(stage.format_reward) <= 1:
            raise ConfigError(f"stage.format_reward={stage.format_reward}: give the format term's share in [0, 1]")
        updates = stage.get("updates_per_rollout", 1)
        if not isinstance(updates, int) or updates < 1:
            raise ConfigError(f"stage.updates_per_rollout={updates}: give the optimizer steps per rollout policy, an "
                              "integer >= 1 (1: every step samples with its own weights)")
        if not 0 < float(stage.epsilon) < 1:
            raise ConfigError(f"stage.epsilon={stage.epsilon}: give the ratio clip in (0, 1), e.g. 0.2")
        if model.moe_input_jitter_eps is not None:
            raise ConfigError(f"model.moe_input_jitter_eps={model.moe_input_jitter_eps}: the jitter would make the "
                              "training forward's log-probs differ from the rollout's (the router is frozen in stage 4 "
                              "anyway): set model.moe_input_jitter_eps=null")
        if data.task != "vqa":
            raise ConfigError(f"stage4 GRPO asks the questions of dataset.task=vqa records (their answers are the "
                              f"reward), not dataset.task={data.task}")
        types = stage.get("question_types")
        if types is not None and (isinstance(types, str) or not types or not all(isinstance(t, str) for t in types)):
            raise ConfigError(f"stage.question_types={types}: give a list of qa types, e.g. [position,colour] "
                              "(null asks every question)")
        data.generations = generations
        data.question_types = list(types) if types is not None else None
    else:
        data.task = "preference"
        if float(stage.sft_weight) < 0:
            raise ConfigError(f"stage.sft_weight={stage.sft_weight}: give the chosen answers' NLL weight, >= 0 "
                              "(0: plain DPO; RPO uses 1)")
    if beta(stage) < 0:
        raise ConfigError(f"stage.beta={stage.beta}: give a value >= 0")


def stage4_step(cfg, container, run_state, tokenizer):
    """(forward step, callbacks) for ``cfg.stage.algorithm``."""
    from nemo_pixellm.preference.dpo import DPOStep
    from nemo_pixellm.preference.grpo import GRPOSettings, GRPOStep
    from nemo_pixellm.preference.reference import ReferenceWeights, RolloutPolicy

    reference = ReferenceWeights()
    stage, m = cfg.stage, container.model
    if stage.algorithm == "dpo":
        return DPOStep(run_state, beta(stage), reference, float(stage.sft_weight)), [reference]
    settings = GRPOSettings(
        generations=int(stage.generations), epsilon=float(stage.epsilon), beta=beta(stage),
        max_new_tokens=int(stage.max_new_tokens), format_weight=float(stage.format_reward), seq_length=container.dataset.seq_length, seed=container.rng.seed,
        use_cache=m.tensor_model_parallel_size == 1, all_steps=m.expert_model_parallel_size > 1,
        updates_per_rollout=int(stage.get("updates_per_rollout", 1)),
    )
    rollout_policy = RolloutPolicy(settings.updates_per_rollout) if settings.updates_per_rollout > 1 else None
    step = GRPOStep(run_state, settings, reference, tokenizer, rollout_policy)
    return step, [reference] + ([rollout_policy] if rollout_policy else [])
