"""The plugin's one boundary with the internals of torch, Megatron-Core and Megatron-Bridge.

Every patch nemo_pixellm makes to those libraries, and every private name it uses, is listed in ``PATCHES``
and ``PRIVATE_NAMES`` below, one line each: what, when, why, and the upstream change that would remove it
(``docs/upstream/`` holds those changes written out). Nothing here runs on import:

    from nemo_pixellm import compat
    compat.enable()      # the entry points (train, evaluate, info, export, launch) call it first

``enable()`` checks the installed Megatron-Core / Megatron-Bridge (and, for the CPU layer, torch) against the
pinned versions and refuses others (``VersionMismatch``; ``NEMO_PIXELLM_UNPINNED_OK=1`` only warns), then applies
the patches the machine needs: the CPU layer when CUDA is absent (Megatron hard-codes CUDA in a few dozen
places, see ../shared/notes/megatron-on-cpu.md: the CUDA *device* is redirected to the CPU at the torch level
rather than at each call site), the no-Transformer-Engine items when TE is absent, and says so on stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from nemo_pixellm.compat.versions import PINNED, PINNED_CPU, VersionMismatch, check_versions  # noqa: F401

NO_CUDA, NO_TE, ALWAYS = "no CUDA", "no Transformer Engine", "always"


@dataclass(frozen=True)
class Patch:
    target: str  # the replaced object, as a dotted path (the module is imported lazily where it is Megatron's)
    when: str
    why: str
    upstream: str  # the upstream change that would make it unnecessary
    used_in: str = ""  # a private name used outside compat/: the one file that uses it (nemo_pixellm/...)


_FACTORY_WHY = "Megatron's optimizer, clip_grads, schedules and Bridge's initialize create tensors with device='cuda'"
_FACTORY_FIX = "Megatron: create on get_current_device() / the parameters' device"

PATCHES: tuple[Patch, ...] = (
    # torch.cuda: the CUDA device is the CPU
    Patch("torch.cuda.current_device", NO_CUDA, "rotary, router, TP mappings, DDP buffers, dist-ckpt allocate on it",
          "Megatron: one megatron.core.utils.get_current_device() that answers cpu without CUDA"),
    Patch("torch.cuda.set_device", NO_CUDA, "Bridge's initialize and model provider set the local rank's device",
          "Bridge: allow_no_cuda skips it"),
    Patch("torch.cuda.synchronize", NO_CUDA, "parallel_state, p2p_communication and DDP synchronise",
          "Megatron: synchronise only when the tensors are on CUDA"),
    Patch("torch.cuda.empty_cache", NO_CUDA, "the optimizer, DDP and Bridge's checkpointing free the CUDA cache",
          "Megatron / Bridge: guard with is_available()"),
    Patch("torch.cuda.Stream", NO_CUDA, "the alltoall dispatcher and the shared expert create side streams",
          "Megatron: torch.Stream of the tensors' device"),
    Patch("torch.cuda.Event", NO_CUDA, "the MoE layer and the 1F1B schedule plan record events", "Megatron: torch.Event"),
    Patch("torch.cuda.current_stream", NO_CUDA, "pipeline-parallel utilities record on the current stream",
          "Megatron: torch.accelerator.current_stream()"),
    Patch("torch.cuda.stream", NO_CUDA, "the MoE layer and shared expert enter stream contexts", "Megatron: torch.accelerator"),
    Patch("torch.cuda.get_rng_state", NO_CUDA, "Bridge's checkpoints save the CUDA RNG state", "Bridge: save it when CUDA is used"),
    Patch("torch.cuda.set_rng_state", NO_CUDA, "Bridge's resume restores the CUDA RNG state", "Bridge: as above"),
    Patch("torch.cuda.manual_seed", NO_CUDA, "Megatron's model_parallel_cuda_manual_seed seeds CUDA", "Megatron: seed the tracker's device"),
    Patch("torch.cuda.random.get_rng_state", NO_CUDA, "the same function, imported through torch.cuda.random", "as above"),
    Patch("torch.cuda.random.set_rng_state", NO_CUDA, "the same function, imported through torch.cuda.random", "as above"),
    Patch("torch.cuda.random.manual_seed", NO_CUDA, "the same function, imported through torch.cuda.random", "as above"),
    # torch tensor factories and conversions
    *(Patch(f"torch.{name}", NO_CUDA, _FACTORY_WHY, _FACTORY_FIX) for name in (
        "tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
        "zeros_like", "ones_like", "empty_like", "full_like")),
    Patch("torch.Tensor.to", NO_CUDA, "Megatron moves tensors .to(current_device()) / 'cuda' (schedules, dist-ckpt)", _FACTORY_FIX),
    Patch("torch.Tensor.type", NO_CUDA, "distrib_optimizer / clip_grads assert p.type() == 'torch.cuda.FloatTensor'",
          "Megatron: compare p.dtype and p.device, not the legacy type name"),
    Patch("torch.Tensor.cuda", NO_CUDA, "Bridge's eval loop and tied embeddings with PP>1 call .cuda()",
          "Megatron / Bridge: .to(the parameters' device)"),
    Patch("torch.nn.Module.cuda", NO_CUDA, "Bridge's provider calls model.cuda(current_device())",
          "Bridge: skip it when CUDA is absent"),
    Patch("torch.distributed.all_to_all_single", NO_CUDA, "the alltoall dispatcher passes split sizes as tensors; gloo takes lists",
          "Megatron: .tolist() the splits (it already syncs them to host)"),
    Patch("os.environ[TORCHDYNAMO_DISABLE]", NO_CUDA, "Megatron's jit fuser is torch.compile: 15-25 s cold per process on a CPU",
          "Megatron: a config switch for jit_fuser"),
    # Megatron-Core
    Patch("megatron.core.tensor_parallel.random._get_cuda_rng_state", NO_CUDA,
          "the RNG tracker's states live on the CPU generator", "Megatron: a device-generic RNG tracker"),
    Patch("megatron.core.tensor_parallel.random._set_cuda_rng_state", NO_CUDA, "as above", "as above"),
    Patch("logging:megatron.core.tensor_parallel.random", NO_CUDA,
          "its 'CPU RNG state changed within GPU RNG context' warning is the tracker working as meant here", "as above"),
    Patch("megatron.core.transformer.moe.token_dispatcher.sort_chunks_by_idxs", ALWAYS,
          "with one EP x TP rank the alltoall dispatcher's chunk sort is the identity, yet copies every routed token "
          "(and again in backward) per MoE layer: ~2% of a CPU training step; skipped for CPU index tensors",
          "Megatron: skip both chunk sorts when tp_size * ep_size == 1"),
    Patch("megatron.core.transformer.multi_latent_attention.Linear", NO_TE,
          "MLASelfAttention accepts a replicated down projection only as this module name, bound only with TE",
          "Megatron: accept any linear with parallel_mode='duplicated' (docs/upstream/mla-replicated-linear.md)"),
    # Megatron-Bridge
    Patch("megatron.bridge.training.initialize.initialize_megatron", NO_CUDA, "it asserts CUDA unless allow_no_cuda=True",
          "Bridge: setup() passes allow_no_cuda when CUDA is absent (docs/upstream/bridge-allow-no-cuda.md)"),
    Patch("megatron.bridge.training.initialize._set_random_seed", NO_CUDA,
          "Bridge skips model_parallel_cuda_manual_seed when no GPU is counted: seed the tracker", "Bridge: as above"),
    Patch("megatron.bridge.training.initialize.compile_helpers", ALWAYS,
          "it runs make in megatron/core/datasets; the wheel has the built helpers and no Makefile (skipped "
          "where they import; on CPU always)",
          "Bridge: skip the build when the helpers import (affects every pip install)"),
    Patch("megatron.bridge.training.initialize.set_jit_fusion_options", NO_CUDA, "its warm-up allocates on CUDA",
          "Bridge: warm up only on CUDA"),
    Patch("megatron.bridge.training.setup.initialize_megatron", NO_CUDA, "setup imported the name before it was patched", "as above"),
    Patch("megatron.bridge.training.setup.set_jit_fusion_options", NO_CUDA, "as above", "as above"),
    Patch("import:megatron.bridge.peft.lora_layers", NO_TE,
          "it imports transformer_engine unguarded; a placeholder module is visible only while it loads",
          "Bridge: guard the import like its other TE uses (docs/upstream/bridge-lora-without-te.md)"),
    Patch("logging:megatron.bridge.utils.import_utils", NO_TE,
          "it logs a traceback at INFO for every TE symbol it probes", "Bridge: log absent optional symbols at DEBUG"),
    Patch("warnings:pynvml", ALWAYS, "torch.cuda imports the deprecated pynvml shim Megatron's dependencies pull in",
          "nvidia-ml-py replaces pynvml in Megatron's dependencies"),
    Patch("importlib.metadata.packages_distributions", ALWAYS,
          "transformers, trl and diffusers (loaded by Bridge through modelopt) each map every installed file at "
          "import: ~1 s each, three times in every process; cached, the map is built once",
          "transformers / trl / diffusers: build the map lazily (or share one)"),
)

# Private names the plugin reads or writes without patching them.
PRIVATE_NAMES: tuple[Patch, ...] = (
    Patch("megatron.bridge.models.model_provider.ModelProviderMixin._pg_collection", ALWAYS,
          "a provider built outside Bridge's setup (info, evaluate, tests) needs its process groups",
          "Bridge: a public pg_collection argument of provide() / finalize()"),
    Patch("megatron.core.models.gpt.gpt_model.GPTModel._preprocess", ALWAYS,
          "PixelGPTModel extends the step that turns position ids into the layers' rotary input, for MLA",
          "Megatron: GPTModel builds MLA's table from position_ids (docs/upstream/mla-position-ids.md)",
          used_in="models/language_model.py"),
    Patch("torch.utils._device._device_constructors", NO_CUDA,
          "`with torch.device(...)` recognises factories by identity in this cached set: fill it before wrapping them",
          "torch: none needed once no factory is wrapped"),
)

# Patches held only while one call runs (not applied by enable()).
SCOPED_PATCHES: tuple[Patch, ...] = (
    Patch("megatron.bridge.models.gpt_provider.MCoreGPTModel", ALWAYS,
          "GPTModelProvider.provide builds this class by name: PixelLMProvider.provide has it build PixelGPTModel",
          "Bridge: a model-class field on GPTModelProvider (docs/upstream/bridge-gpt-model-class.md)"),
)

_ENABLED = False


def is_enabled() -> bool:
    return _ENABLED


def cuda_absent() -> bool:
    import torch

    return not torch.cuda.is_available()


def te_absent() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is None


def enable(quiet: bool = False, entry_point: bool = False) -> list[Patch]:
    """Check the versions, then apply the patches this machine needs (once). Returns them.
    ``entry_point``: a version mismatch prints its message and exits 2 instead of raising."""
    global _ENABLED
    from nemo_pixellm.compat import cpu, megatron

    if _ENABLED:
        return applied()
    no_cuda, no_te = cuda_absent(), te_absent()
    try:
        unpinned = check_versions(cpu_layer=no_cuda)
    except VersionMismatch as error:
        if not entry_point:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    cpu.filter_pynvml_warning()
    _cache_package_map()
    if no_cuda:
        cpu.install()
    megatron.install(no_cuda=no_cuda, no_te=no_te)
    _ENABLED = True
    patches = applied()
    if not quiet and os.environ.get("RANK", "0") == "0":
        layers = [w for w, on in ((NO_CUDA, no_cuda), (NO_TE, no_te)) if on]
        print(f"[pixellm] compat: {len(patches)} patches for {', '.join(layers) or 'GPU with TE'} "
              f"(megatron-core {PINNED['megatron-core']}, megatron-bridge {PINNED['megatron-bridge']}"
              f"{', torch ' + PINNED_CPU['torch'] if no_cuda else ''}; listed in nemo_pixellm/compat)"
              + (f"; UNPINNED: {'; '.join(unpinned)}" if unpinned else ""), file=sys.stderr, flush=True)
    return patches


def _cache_package_map() -> None:
    import functools
    import importlib.metadata

    importlib.metadata.packages_distributions = functools.cache(importlib.metadata.packages_distributions)


def applied() -> list[Patch]:
    """The listed patches that apply on this machine (Megatron's are made when their module loads)."""
    if not _ENABLED:
        return []
    on = {ALWAYS} | ({NO_CUDA} if cuda_absent() else set()) | ({NO_TE} if te_absent() else set())
    return [p for p in PATCHES if p.when in on]


def set_process_groups(provider, pg_collection) -> None:
    """Give a model provider built outside Bridge's setup its process groups (Bridge's setup does this)."""
    provider._pg_collection = pg_collection


def process_groups(provider):
    return getattr(provider, "_pg_collection", None)


@contextlib.contextmanager
def gpt_model_class(cls):
    """Bridge's GPTModelProvider.provide builds ``cls`` (a GPTModel subclass) while this is held."""
    from megatron.bridge.models import gpt_provider

    bridge_class = gpt_provider.MCoreGPTModel
    gpt_provider.MCoreGPTModel = cls
    try:
        yield
    finally:
        gpt_provider.MCoreGPTModel = bridge_class


def seed_model_parallel_rng(seed: int, pg_collection) -> None:
    """What Bridge does on a GPU and skips on CPU: seed the RNG tracker's TP / EP / data-parallel states."""
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
