"""Every bad config of tests/test_config.py, with the message it gets and the time to that message.

    .venv/bin/python benchmarks/bad_configs.py [--cli N]

In-process: Hydra compose + ``build_config`` until the ConfigError (what ``launch --dry-run`` runs). ``--cli N``
also runs the first N cases as ``python -m nemo_pixellm.train`` and times the whole process (Python, torch and
Megatron-Bridge imports included), checking its exit code 2 and that nothing was trained.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nemo_pixellm import compat  # noqa: E402

compat.enable()

from test_config import BAD_CONFIGS, compose_cfg, write_bad_config_dirs  # noqa: E402

from nemo_pixellm.training.config import build_config  # noqa: E402
from nemo_pixellm.training.validate import ConfigError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", type=int, default=0, help="also run the first N cases through the CLI")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bad-configs-"))
    dirs = write_bad_config_dirs(root)
    print("| overrides | seconds (in-process) | message |\n|---|---|---|")
    for overrides, _ in BAD_CONFIGS:
        filled = [o.format(d=dirs) for o in overrides]
        world = 2 if any("pipeline" in o for o in overrides) else 1
        start = time.perf_counter()
        try:
            build_config(compose_cfg(["+stage=stage2", *filled]), world_size=world)
            message = "NO ERROR"
        except ConfigError as error:
            message = str(error)
        seconds = time.perf_counter() - start
        print(f"| `{' '.join(overrides)}` | {seconds:.3f} | {message.replace(str(dirs), '<d>')} |")
    for overrides, _ in BAD_CONFIGS[: args.cli]:
        if any("pipeline" in o for o in overrides):
            continue
        filled = [o.format(d=dirs) for o in overrides]
        run_dir = root / "run"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "nemo_pixellm.train", "+stage=stage2", *filled,
                               f"run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
        seconds = time.perf_counter() - start
        error = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), proc.stderr[-300:])
        print(f"CLI `{' '.join(overrides)}`: exit {proc.returncode} after {seconds:.1f} s, trained nothing: "
              f"{not (run_dir / 'metrics.jsonl').exists()}; {error.replace(str(dirs), '<d>')[:160]}")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
