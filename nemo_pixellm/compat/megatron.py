"""The Megatron-Core / Megatron-Bridge patches (listed in ``nemo_pixellm.compat.PATCHES``), made as each module
loads (an import hook) or at once when it is already loaded, so ``enable()`` imports nothing the caller does
not use."""

import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types

import torch

_RANDOM = "megatron.core.tensor_parallel.random"
_MLA = "megatron.core.transformer.multi_latent_attention"
_INIT = "megatron.bridge.training.initialize"
_SETUP = "megatron.bridge.training.setup"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_LORA = "megatron.bridge.peft.lora_layers"
_LORA_DEPS = ("megatron.core.transformer.moe.moe_utils", "megatron.bridge.peft.adapter_wrapper",
              "megatron.bridge.peft.lora_merge")


class _CPURNGStateFilter(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _after_random(mrandom) -> None:
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).addFilter(_CPURNGStateFilter())


def _after_mla(mla) -> None:
    if mla.Linear is None:
        from nemo_pixellm.models.replicated_linear import ReplicatedLinear

        mla.Linear = ReplicatedLinear


def _after_dispatcher(dispatcher) -> None:
    sort_chunks_by_idxs = dispatcher.sort_chunks_by_idxs

    @functools.wraps(sort_chunks_by_idxs)
    def sort_unless_identity(input, split_sizes, sorted_idxs, probs=None, fused=False):
        # One EP x TP rank: the chunks are already in expert order (checked on CPU tensors only: no GPU sync).
        if sorted_idxs.device.type == "cpu" and torch.equal(sorted_idxs, torch.arange(len(sorted_idxs))):
            return input, probs
        return sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=probs, fused=fused)

    dispatcher.sort_chunks_by_idxs = sort_unless_identity


def _after_initialize(initialize) -> None:
    from nemo_pixellm.compat import seed_model_parallel_rng

    initialize_megatron = initialize.initialize_megatron
    set_random_seed = initialize._set_random_seed

    @functools.wraps(initialize_megatron)
    def initialize_megatron_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    @functools.wraps(set_random_seed)
    def set_random_seed_on_cpu(seed_, *args, pg_collection, **kwargs):
        set_random_seed(seed_, *args, pg_collection=pg_collection, **kwargs)
        seed_model_parallel_rng(seed_, pg_collection)

    initialize.initialize_megatron = initialize_megatron_without_cuda
    initialize._set_random_seed = set_random_seed_on_cpu
    initialize.compile_helpers = lambda: None
    initialize.set_jit_fusion_options = lambda *args, **kwargs: None


def _skip_built_helpers(initialize) -> None:
    """With CUDA: run Bridge's make of the dataset helpers only where they are not already built."""
    compile_helpers = initialize.compile_helpers

    @functools.wraps(compile_helpers)
    def compile_unless_built():
        if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
            compile_helpers()

    initialize.compile_helpers = compile_unless_built


def _after_setup(setup) -> None:
    initialize = importlib.import_module(_INIT)
    setup.initialize_megatron = initialize.initialize_megatron
    setup.set_jit_fusion_options = initialize.set_jit_fusion_options


class _AbsentTE(type):
    """Any attribute of the placeholder is another placeholder class (usable in annotations / isinstance)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentTE(name, (), {})


class _AbsentTEModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentTE(name, (), {})


def _load_lora_without_te(exec_module, module) -> None:
    for dep in _LORA_DEPS:  # imported first: their own HAVE_TE probes must see the real ImportError
        importlib.import_module(dep)
    te = _AbsentTEModule("transformer_engine")
    te.pytorch = _AbsentTEModule("transformer_engine.pytorch")
    sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te.pytorch
    try:
        exec_module(module)
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, after: dict, wrap: dict):
        self.after, self.wrap = after, wrap  # module -> fn(module) after it runs / fn(exec_module, module) instead

    def find_spec(self, name, path, target=None):
        if name not in self.after and name not in self.wrap:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def exec_patched(module):
            if name in self.wrap:
                self.wrap[name](exec_module, module)
            else:
                exec_module(module)
                self.after[name](module)

        spec.loader.exec_module = exec_patched
        return spec


def install(no_cuda: bool, no_te: bool) -> None:
    after = {}
    if no_cuda:
        after.update({_RANDOM: _after_random, _INIT: _after_initialize, _SETUP: _after_setup})
    else:
        after[_INIT] = _skip_built_helpers
    after[_DISPATCHER] = _after_dispatcher
    if no_te:
        after[_MLA] = _after_mla
        logging.getLogger("megatron.bridge.utils.import_utils").addFilter(lambda r: r.levelno >= logging.WARNING)
    wrap = {_LORA: _load_lora_without_te} if no_te else {}
    loaded = [name for name in after if name in sys.modules]
    for name in (_RANDOM, _DISPATCHER, _MLA, _INIT, _SETUP):  # in dependency order
        if name in loaded:
            after[name](sys.modules[name])
    sys.meta_path.insert(0, _PatchOnImport({n: f for n, f in after.items() if n not in loaded}, wrap))
