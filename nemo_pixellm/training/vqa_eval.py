"""Held-out VQA accuracy during training (the same questions and decoding as ``nemo_pixellm.evaluate``),
every ``vqa_eval.interval`` steps: printed, written to TensorBoard as ``vqa/<type>`` and appended to
``<run_dir>/vqa.jsonl`` ({"step", "vqa": {type: {"n", "accuracy", "chance"}}}: the curves benchmarks/stage_chain.py plots).
With EMA on, the EMA weights are evaluated (swapped in for the evaluation, then swapped back)."""

import contextlib
import json
from pathlib import Path

import torch
from megatron.bridge.training.callbacks import Callback
from megatron.core.utils import unwrap_model

from nemo_pixellm.data import sources
from nemo_pixellm.evaluate import EvalArgs, ask_questions, summarize
from nemo_pixellm.training.ema import trainable_parameters
from nemo_pixellm.training.run_state import finished_step


class VQAEvalCallback(Callback):
    def __init__(self, interval: int, samples: int, ema=None, run_dir: str | None = None):
        self.interval, self.args, self.ema = interval, EvalArgs(samples=samples), ema
        self.curve_file = Path(run_dir) / "vqa.jsonl" if run_dir else None

    @contextlib.contextmanager
    def _ema_weights(self, model_chunks):
        if self.ema is None:
            yield
            return
        params = trainable_parameters(model_chunks)
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def on_train_step_end(self, context) -> None:
        step = finished_step(context)
        if step % self.interval:
            return
        if len(context.model) > 1 or context.state.cfg.model.pipeline_model_parallel_size > 1:
            raise ValueError("vqa_eval.interval needs pipeline_model_parallel_size=1: evaluate checkpoints instead")
        data_config = context.state.cfg.dataset
        self.args.use_cache = context.state.cfg.model.tensor_model_parallel_size == 1
        model = unwrap_model(context.model[0])
        model.eval()
        try:  # every rank decodes the same questions (tensor / expert parallel layers need all of them)
            with self._ema_weights(context.model):
                summary = summarize(ask_questions(model, data_config, sources.load_tokenizer(data_config), self.args))
        finally:
            model.train()
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            per_type = " ".join(f"{k} {v['accuracy']:.1%}" for k, v in summary.items())
            print(f"[pixellm] step {step}: held-out VQA accuracy {per_type}", flush=True)
            if self.curve_file is not None:
                self.curve_file.parent.mkdir(parents=True, exist_ok=True)
                with self.curve_file.open("a") as f:
                    f.write(json.dumps({"step": step, "vqa": summary}) + "\n")
            writer = context.state.tensorboard_logger
            if writer is not None:
                for kind, row in summary.items():
                    writer.add_scalar(f"vqa/{kind}", row["accuracy"], step)
