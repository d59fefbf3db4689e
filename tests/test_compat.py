"""nemo_pixellm.compat, the one boundary with torch / Megatron / Bridge internals: importing the package changes
nothing; enable() refuses unpinned versions, applies exactly the patches it lists (the CPU layer only without
CUDA), and with them CUDA requests land on the CPU, Megatron's RNG tracker uses the CPU generator and
megatron.bridge imports without Transformer Engine. (conftest.py has enabled it for this process.)"""

import os
import subprocess
import sys

import torch

from nemo_pixellm import compat


def run_fresh_python(lines: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run statements in a new interpreter (a clean import state); they end by printing 'ok'."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TORCHDYNAMO_DISABLE"}  # conftest's enable() set it
    out = subprocess.run([sys.executable, "-c", "\n".join([*lines, "print('ok')"])], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    return out


# Every attribute of these namespaces, by identity: what a patch would change.
SNAPSHOT = [
    "import os, sys, types, warnings, logging, torch, torch.distributed",
    "import torch._dynamo  # torch's own lazy import rewraps torch.manual_seed: done before the first snapshot",
    "spaces = {'torch': torch, 'torch.cuda': torch.cuda, 'torch.cuda.random': torch.cuda.random,",
    "          'torch.Tensor': torch.Tensor, 'torch.nn.Module': torch.nn.Module, 'torch.distributed': torch.distributed}",
    "def snapshot():",
    "    return {f'{n}.{k}': id(v) for n, s in spaces.items() for k, v in list(vars(s).items())",
    "            if not isinstance(v, types.ModuleType)}  # submodules appear as Megatron imports them",
]


def test_importing_the_package_changes_nothing():
    run_fresh_python([
        *SNAPSHOT,
        "before, env = snapshot(), dict(os.environ)",
        "import nemo_pixellm, nemo_pixellm.compat, nemo_pixellm.tiling, nemo_pixellm.data.samples",
        "import nemo_pixellm.models.mla, nemo_pixellm.models.specs, nemo_pixellm.models.pixellm",
        "after = snapshot()",
        "assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))",
        "assert not [h for h in sys.meta_path if type(h).__module__.startswith('nemo_pixellm')]",
        "assert not [f for f in warnings.filters if 'pynvml' in str(f[1])]",
        "assert os.environ.get('TORCHDYNAMO_DISABLE') == env.get('TORCHDYNAMO_DISABLE')",
        "import megatron.core.tensor_parallel.random as r, megatron.core.transformer.multi_latent_attention as m",
        "assert r._get_cuda_rng_state.__module__ == r.__name__ and m.Linear is None  # Megatron as shipped",
        "assert not nemo_pixellm.compat.is_enabled()",
    ])


def test_enable_applies_exactly_the_listed_patches():
    """The attributes enable() changes in torch are those PATCHES names, and each Megatron/Bridge target named
    there is replaced once its module loads (megatron.bridge imports without Transformer Engine): nothing is
    patched that the list does not say."""
    out = run_fresh_python([
        *SNAPSHOT,
        "before = snapshot()",
        "from nemo_pixellm import compat",
        "patches = compat.enable()",
        "after = snapshot()",
        "changed = {k for k in before if after.get(k) != before[k]} | (set(after) - set(before))",
        "listed = {p.target for p in patches}",
        "assert changed == {t for t in listed if t.rsplit('.', 1)[0] in spaces}, sorted(changed ^ listed)",
        "assert os.environ['TORCHDYNAMO_DISABLE'] == '1' and 'os.environ[TORCHDYNAMO_DISABLE]' in listed",
        "import importlib.metadata",
        "assert importlib.metadata.packages_distributions() is importlib.metadata.packages_distributions()  # built once",
        "import importlib, megatron.bridge  # without Transformer Engine",
        "from megatron.bridge.training import setup  # loads initialize too",
        "from megatron.bridge.training.pretrain import pretrain",
        "import megatron.core.extensions.transformer_engine as te_ext",
        "assert not te_ext.HAVE_TE and 'transformer_engine' not in sys.modules  # the placeholder is gone again",
        "import megatron.core.tensor_parallel.random, megatron.core.transformer.multi_latent_attention",
        "import megatron.core.transformer.moe.token_dispatcher",
        "from nemo_pixellm.models.replicated_linear import ReplicatedLinear",
        "megatron_targets = [t for t in listed if t.startswith('megatron.')]",
        "assert len(megatron_targets) == 10, megatron_targets",
        "for target in megatron_targets:",
        "    module, name = target.rsplit('.', 1)",
        "    value = getattr(importlib.import_module(module), name)",
        "    ours = value is ReplicatedLinear or hasattr(value, '__wrapped__') or value.__module__.startswith('nemo_pixellm')",
        "    assert ours, target",
        "print(len(patches), len(compat.PATCHES), len(compat.PRIVATE_NAMES))",
    ])
    applied, listed, private = map(int, out.stdout.split()[-4:-1])
    assert applied == listed == len(compat.PATCHES) and private == len(compat.PRIVATE_NAMES)
    assert "[pixellm] compat: " in out.stderr and "listed in nemo_pixellm/compat" in out.stderr
    for patch in (*compat.PATCHES, *compat.PRIVATE_NAMES, *compat.SCOPED_PATCHES):  # one line each: why, and what upstream would fix it
        assert patch.why and patch.upstream and patch.when in (compat.NO_CUDA, compat.NO_TE, compat.ALWAYS)


def test_unpinned_versions_are_refused():
    fake = ["import importlib.metadata as m", "real = m.version",
            "m.version = lambda n: '0.18.0' if n == 'megatron-core' else real(n)"]
    out = subprocess.run([sys.executable, "-c", "\n".join([*fake, "import runpy",
                                                           "runpy.run_module('nemo_pixellm.info', run_name='__main__')"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert ("error: nemo_pixellm's compatibility layer was written for megatron-core==0.19.2, megatron-bridge==0.6.2, "
            "torch==2.14.1; installed: megatron-core 0.18.0 (pinned 0.19.2)") in out.stderr
    assert "NEMO_PIXELLM_UNPINNED_OK=1" in out.stderr and "Traceback" not in out.stderr
    run_fresh_python([*fake, "import torch", "original = torch.cuda.current_device",
                      "from nemo_pixellm import compat", "import pytest",
                      "with pytest.raises(compat.VersionMismatch, match='megatron-core 0.18.0'):",
                      "    compat.enable()",
                      "assert not compat.is_enabled() and torch.cuda.current_device is original  # nothing applied"])

    warned = run_fresh_python([*fake, "from nemo_pixellm import compat", "compat.enable()"],
                              env=dict(os.environ, NEMO_PIXELLM_UNPINNED_OK="1"))
    assert "UNPINNED: megatron-core 0.18.0 (pinned 0.19.2)" in warned.stderr


def test_enabled_without_cuda_and_idempotent():
    assert not torch.cuda.is_available()
    assert compat.is_enabled()
    assert compat.enable() == compat.applied()
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


def test_enable_after_megatron_loaded_still_patches_it():
    """A library user who imported Megatron first: enable() patches the modules already loaded."""
    run_fresh_python([
        "import megatron.core.tensor_parallel.random as r, megatron.core.transformer.multi_latent_attention as m",
        "from nemo_pixellm import compat",
        "compat.enable()",
        "from nemo_pixellm.models.replicated_linear import ReplicatedLinear",
        "assert r._get_cuda_rng_state.__module__ == 'nemo_pixellm.compat.megatron' and m.Linear is ReplicatedLinear",
    ])


def test_no_cpu_layer_when_cuda_is_available():
    run_fresh_python([
        "import torch",
        "torch.cuda.is_available = lambda: True",
        "original = torch.cuda.current_device",
        "from nemo_pixellm import compat",
        "patches = compat.enable(quiet=True)",
        "assert torch.cuda.current_device is original",
        "assert not hasattr(torch.zeros, '__wrapped__')  # factories untouched",
        "assert {p.when for p in patches} <= {compat.NO_TE, compat.ALWAYS}",
        "import megatron.core.tensor_parallel.random as r",
        "assert r._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'",
    ], timeout=120)


def test_no_patch_or_private_name_outside_compat():
    """The boundary holds: outside nemo_pixellm/compat/ the package assigns no torch / Megatron attribute, adds
    no import hook or warning filter, and uses none of the private names compat lists."""
    import re
    from pathlib import Path

    package = Path(compat.__file__).parents[1]
    def forbidden(path):  # a private name listed with used_in may appear in that one file
        private = [re.escape(p.target.rsplit(".", 1)[1]) for p in compat.PRIVATE_NAMES if p.used_in != path]
        return re.compile("|".join([
            r"^\s*(torch|megatron|mcore_\w+|te)\.[\w.]+\s*=[^=]",  # assigning a library's attribute
            r"sys\.meta_path", r"warnings\.filterwarnings", r"TORCHDYNAMO",
            *private,
        ]), re.M)
    hits = [f"{name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
            for path in package.rglob("*.py") if "compat" not in path.parts
            for name in [str(path.relative_to(package))]
            for text in [path.read_text()] for m in forbidden(name).finditer(text)]
    assert not hits, hits
    used_in = [p.used_in for p in compat.PRIVATE_NAMES if p.used_in]
    assert all(p.target.rsplit(".", 1)[1] in (package / p.used_in).read_text()
               for p in compat.PRIVATE_NAMES if p.used_in), used_in  # the listed place is the real one
