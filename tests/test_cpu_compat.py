"""The CPU compatibility layer: active only without CUDA, redirects CUDA requests to the CPU, keeps
Megatron's RNG tracker on the CPU generator, and lets megatron.bridge import without Transformer Engine."""

import subprocess
import sys

import torch

import nemo_pixellm  # noqa: F401
from nemo_pixellm import cpu_compat


def test_installed_without_cuda_and_idempotent():
    assert not torch.cuda.is_available()
    assert cpu_compat.is_installed()
    assert cpu_compat.install() is True
    # Asking still gives the truthful answer: code with a CPU branch keeps taking it.
    assert torch.cuda.device_count() == 0


def test_cuda_requests_land_on_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to("cuda", torch.float64).dtype == torch.float64
    assert x.type() == "torch.cuda.FloatTensor"  # what Megatron's optimizer asserts
    assert x.type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def test_device_context_still_places_factory_tensors():
    """`with torch.device("meta")` (how transformers builds a model before loading it) still reaches the patched
    factories; when it did not, from_pretrained left DeepseekV3's rotary inv_freq as uninitialised memory."""
    with torch.device("meta"):
        made = [torch.empty(2), torch.zeros(2), torch.arange(4), torch.ones(2), torch.randn(2), torch.full((2,), 1.0)]
    assert [t.device.type for t in made] == ["meta"] * len(made)
    assert torch.zeros(2, device="cuda").device.type == "cpu"  # and CUDA requests still land on the CPU


def test_rng_tracker_follows_megatron_seed_rule():
    """model_parallel_cuda_manual_seed: model-parallel state = seed + 2718 + tp_rank (Megatron's rule),
    drawn here from the CPU generator; forking restores the default stream."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    before = torch.get_rng_state()
    with mrandom.get_cuda_rng_tracker().fork():
        drawn = torch.rand(5)
    expected = torch.rand(5, generator=torch.Generator().manual_seed(123 + 2718 + 1))
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.get_rng_state(), before)
    with mrandom.get_cuda_rng_tracker().fork():
        again = torch.rand(5)  # the tracker advanced: a fresh draw, not a repeat
    assert not torch.equal(again, drawn)


def run_fresh_python(lines: list[str], timeout: int = 300) -> None:
    """Run statements in a new interpreter (a clean import state); they end by printing 'ok'."""
    out = subprocess.run([sys.executable, "-c", "\n".join([*lines, "print('ok')"])], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_bridge_imports_without_transformer_engine():
    run_fresh_python([
        "import sys, nemo_pixellm, megatron.bridge",
        "from megatron.bridge.training.pretrain import pretrain",
        "import megatron.core.extensions.transformer_engine as te_ext",
        "assert not te_ext.HAVE_TE",
        "assert 'transformer_engine' not in sys.modules",
        "import megatron.bridge.training.initialize as init",
        "assert init.initialize_megatron.__wrapped__ is not None  # patched: allow_no_cuda=True",
    ])


def test_never_installed_when_cuda_is_available():
    run_fresh_python([
        "import torch",
        "torch.cuda.is_available = lambda: True",
        "original = torch.cuda.current_device",
        "import nemo_pixellm",
        "from nemo_pixellm import cpu_compat",
        "assert not cpu_compat.is_installed()",
        "assert torch.cuda.current_device is original",
        "assert not hasattr(torch.zeros, '__wrapped__')  # factories untouched",
        "import megatron.core.tensor_parallel.random as r",
        "assert r._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'",
    ], timeout=120)
