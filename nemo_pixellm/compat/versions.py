"""The versions the compatibility patches were written against, and the check that refuses others."""

import os
from importlib import metadata

# torch only matters where the CPU layer patches it (GPU images bring their own torch build).
PINNED = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}
PINNED_CPU = {"torch": "2.14.1"}
OVERRIDE_ENV = "NEMO_PIXELLM_UNPINNED_OK"  # "1": warn instead of refusing (trying a newer release)


class VersionMismatch(RuntimeError):
    pass


def installed(package: str) -> str | None:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return version.split("+", 1)[0]  # a local build tag (+cu130, +cpu) is the same release


def mismatches(cpu_layer: bool) -> list[str]:
    wanted = {**PINNED, **(PINNED_CPU if cpu_layer else {})}
    return [f"{name} {installed(name) or 'not installed'} (pinned {want})"
            for name, want in wanted.items() if installed(name) != want]


def check_versions(cpu_layer: bool) -> list[str]:
    """Raise VersionMismatch naming every package whose installed release is not the pinned one; with
    NEMO_PIXELLM_UNPINNED_OK=1 return them instead (the caller warns)."""
    wrong = mismatches(cpu_layer)
    if wrong and os.environ.get(OVERRIDE_ENV) != "1":
        pins = ", ".join(f"{n}=={v}" for n, v in {**PINNED, **(PINNED_CPU if cpu_layer else {})}.items())
        raise VersionMismatch(
            f"nemo_pixellm's compatibility layer was written for {pins}; installed: {'; '.join(wrong)}. "
            f"Install the lock (make setup, or pip install --no-deps -r requirements/lock-cpu.txt), or set "
            f"{OVERRIDE_ENV}=1 to try these versions anyway")
    return wrong
