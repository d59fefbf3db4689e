"""Run Megatron-Core 0.19.2 and Megatron-Bridge 0.6.2 on a machine with no GPU (fp32, gloo).

Megatron hard-codes CUDA in a few dozen places (see ../shared/notes/megatron-on-cpu.md). Rather than
patching each call site, this module redirects the CUDA *device* to the CPU at the torch level:

- ``torch.cuda.current_device()`` returns ``torch.device("cpu")``; set_device / synchronize /
  empty_cache / streams / events become no-ops; the CUDA RNG functions act on the CPU generator.
  ``torch.cuda.is_available()`` and ``device_count()`` keep answering False / 0, so code that asks
  still takes its CPU branch.
- Tensor factories called with ``device="cuda"`` and ``Tensor.cuda()`` / ``.to("cuda")`` stay on CPU, and
  ``Tensor.type()`` names CPU tensors as CUDA ones (Megatron asserts ``"torch.cuda.FloatTensor"``).
- ``all_to_all_single`` takes the split sizes Megatron's alltoall dispatcher keeps in tensors (EP>1).
- Megatron's RNG tracker keeps its states on the CPU generator, and is seeded after Bridge's
  initialisation (Bridge skips ``model_parallel_cuda_manual_seed`` when no GPU is counted).
- Bridge: ``allow_no_cuda=True``; no ``compile_helpers()`` (the wheel has no Makefile, the prebuilt
  helpers are present); no JIT warm-up (it allocates on CUDA); and ``megatron.bridge`` can be imported
  without Transformer Engine (one unguarded ``import transformer_engine.pytorch`` in peft/lora_layers).

``install()`` does all of this once, and only when CUDA is absent: on a GPU machine it does nothing.
``nemo_pixellm/__init__.py`` calls it, so importing the package is enough.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import types

import torch
import torch.utils._device

_INSTALLED = False
_CPU = torch.device("cpu")

# Factories Megatron calls with device="cuda" (optimizer, clip_grads, schedules, bridge initialize).
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def needed() -> bool:
    """The layer is needed exactly when no CUDA device can be used."""
    return not torch.cuda.is_available()


def is_installed() -> bool:
    return _INSTALLED


def install() -> bool:
    """Install the CPU layer if CUDA is absent. Returns True if it is (now) installed."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not needed():
        return False
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit fuser is torch.compile: 15-25 s cold per process
    _patch_torch_cuda()
    _patch_factories()
    _patch_all_to_all()
    sys.meta_path.insert(0, _MegatronOnCPU())
    # Bridge logs a traceback at INFO for every TE symbol it probes; without TE that is expected.
    logging.getLogger("megatron.bridge.utils.import_utils").addFilter(lambda record: record.levelno >= logging.WARNING)
    if "megatron.core.tensor_parallel.random" in sys.modules:
        _after_megatron_random(sys.modules["megatron.core.tensor_parallel.random"])
    _INSTALLED = True
    return True


# --------------------------------------------------------------------------------------------- torch
def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare int means a CUDA ordinal


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream(_NullEvent):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *args, **kwargs: None
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.Stream, cuda.Event = _NullStream, _NullEvent
    cuda.current_stream = cuda.default_stream = lambda *args, **kwargs: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.manual_seed(seed)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *args, **kwargs: 0)


def _redirect_device(factory):
    @functools.wraps(factory)
    def on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return on_cpu


def _patch_factories() -> None:
    # `with torch.device(...)` recognises factories by identity in a cached set: fill it with the originals
    # first, or the context (transformers' meta-device loading, for one) silently stops placing tensors.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], int) and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to
    tensor_type = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        # Megatron checks p.type() == "torch.cuda.FloatTensor" (clip_grads, distrib_optimizer).
        if dtype is None and not kwargs:
            name = tensor_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def _patch_all_to_all() -> None:
    """Megatron's alltoall token dispatcher passes split sizes as tensors; gloo's binding takes lists."""
    import torch.distributed as dist

    all_to_all_single = dist.all_to_all_single

    @functools.wraps(all_to_all_single)
    def with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    dist.all_to_all_single = with_list_splits


# ------------------------------------------------------------------------------------------ megatron
class _CPURNGStateFilter(logging.Filter):
    # Megatron warns when the CPU RNG moves inside a "GPU" fork; here the fork *is* the CPU generator.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _after_megatron_random(mrandom) -> None:
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mrandom.__name__).addFilter(_CPURNGStateFilter())


def seed_model_parallel_rng(seed: int, pg_collection) -> None:
    """What Bridge does on a GPU and skips on CPU: seed the tracker's TP / EP / data-parallel states."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_pg_rank

    pp_rank = get_pg_rank(pg_collection.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed + 100 * pp_rank,
        tp_rank=get_pg_rank(pg_collection.tp),
        ep_rank=get_pg_rank(pg_collection.ep),
        etp_rank=get_pg_rank(pg_collection.expt_tp),
        force_reset_rng=True,
    )


class _AbsentTE(type):
    """Any attribute of the placeholder is another placeholder class (usable in annotations/isinstance)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentTE(name, (), {})


class _AbsentTEModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentTE(name, (), {})


class _MegatronOnCPU(importlib.abc.MetaPathFinder):
    """Import hook that patches the Megatron modules needing help on CPU as they load (so that
    ``import nemo_pixellm`` stays cheap and nothing is imported that the user does not use).

    - ``megatron.core.tensor_parallel.random``: the RNG tracker's states live on the CPU generator.
    - ``megatron.bridge.peft.lora_layers`` imports Transformer Engine unguarded: it sees a placeholder
      ``transformer_engine`` only while its own body runs, so every other HAVE_TE probe stays False.
    - ``megatron.bridge.training.initialize`` / ``setup``: patched right after they load.
    """

    _LORA = "megatron.bridge.peft.lora_layers"
    _LORA_DEPS = (
        "megatron.core.transformer.moe.moe_utils",
        "megatron.bridge.peft.adapter_wrapper",
        "megatron.bridge.peft.lora_merge",
    )
    _RANDOM = "megatron.core.tensor_parallel.random"
    _INIT = "megatron.bridge.training.initialize"
    _SETUP = "megatron.bridge.training.setup"

    def find_spec(self, name, path, target=None):
        if name not in (self._LORA, self._RANDOM, self._INIT, self._SETUP):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module
        after = {
            self._LORA: None, self._RANDOM: _after_megatron_random,
            self._INIT: _after_bridge_initialize, self._SETUP: _after_bridge_setup,
        }[name]

        def exec_patched(module):
            if name == self._LORA:
                for dep in self._LORA_DEPS:
                    importlib.import_module(dep)
                te = _AbsentTEModule("transformer_engine")
                te.pytorch = _AbsentTEModule("transformer_engine.pytorch")
                sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te.pytorch
                try:
                    exec_module(module)
                finally:
                    del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]
            else:
                exec_module(module)
                after(module)

        spec.loader.exec_module = exec_patched
        return spec


def _after_bridge_initialize(initialize) -> None:
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
    initialize.compile_helpers = lambda: None  # prebuilt helpers ship in the wheel; the Makefile does not
    initialize.set_jit_fusion_options = lambda *args, **kwargs: None  # warm-up allocates on CUDA


def _after_bridge_setup(setup) -> None:
    import megatron.bridge.training.initialize as initialize

    setup.initialize_megatron = initialize.initialize_megatron
    setup.set_jit_fusion_options = initialize.set_jit_fusion_options
