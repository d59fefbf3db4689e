"""The CPU layer's torch patches (listed in ``nemo_pixellm.compat.PATCHES``): the CUDA device is the CPU.

``torch.cuda.is_available()`` and ``device_count()`` keep answering False / 0, so code that asks still takes
its CPU branch; what Megatron does without asking (allocating on ``current_device()``, ``device="cuda"``,
``.cuda()``, streams, the CUDA RNG) lands on the CPU.
"""

import contextlib
import functools
import os
import warnings

import torch
import torch.utils._device

_CPU = torch.device("cpu")
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
             "zeros_like", "ones_like", "empty_like", "full_like")


def filter_pynvml_warning() -> None:
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)


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
    cuda.current_stream = lambda *args, **kwargs: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.manual_seed(seed)


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
    for name in FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    tensor_to = torch.Tensor.to

    @functools.wraps(tensor_to)
    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], int) and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to
    tensor_type = torch.Tensor.type

    @functools.wraps(tensor_type)
    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = tensor_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def _patch_all_to_all() -> None:
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


def install() -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _patch_torch_cuda()
    _patch_factories()
    _patch_all_to_all()
