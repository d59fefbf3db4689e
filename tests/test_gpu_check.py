"""scripts/gpu_check.sh without a GPU: the dry run lists every check (CI runs it), a real run refuses clearly."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(*args):
    return subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True, cwd=ROOT)


def test_dry_run_lists_the_checks_in_order():
    import gpu_check

    out = run("--dry-run")
    assert out.returncode == 0, out.stderr
    listed = [line.split(":")[0].split(". ", 1)[1] for line in out.stdout.splitlines() if line[:1].isdigit()]
    assert listed == list(gpu_check.CHECKS)
    assert {"logits_cuda_vs_cpu", "train_entry_point", "generate_cuda_vs_cpu", "packed_thd",
            "pixel_slice_throughput"} <= set(listed)


def test_a_real_run_without_cuda_refuses_with_the_way_out():
    out = run()
    assert out.returncode == 2
    assert "no CUDA device here" in out.stderr and "--dry-run" in out.stderr
