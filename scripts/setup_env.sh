#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv/ from the pinned lock file.
# Idempotent: a second run with an unchanged lock file does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements/lock-cpu.txt"
STAMP="$VENV/.nemo_pixellm-lock.sha256"

want="$(cat "$LOCK" "$ROOT/scripts/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

find_python() {
  for cand in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [[ -n "$cand" ]] || continue
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$cand" || echo "$cand"; return 0
    fi
  done
  echo "error: Python 3.12 not found; install it or set PYTHON=/path/to/python3.12" >&2
  return 1
}

PY="$(find_python)"
echo "[setup] creating $VENV with $PY"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_CONSTRAINT=""   # the lock file is the only source of versions

# 1) The whole lock, no resolver: the resolver would pull megatron-core down to 0.12.3
#    (megatron-core[dev] wants nvidia-resiliency-ext wheels this glibc cannot take).
"${PIP[@]}" install --no-deps -r "$LOCK"

# 2) fast-hadamard-transform is source-only: build its Python part against the installed torch.
FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE FAST_HADAMARD_TRANSFORM_SKIP_CUDA_BUILD=TRUE \
  "${PIP[@]}" install --no-build-isolation --no-deps fast-hadamard-transform==1.1.0

# 3) nvidia-resiliency-ext ships only manylinux_2_39 wheels; it is pure Python apart from a CUPTI
#    extension that is never loaded on CPU, so install the wheel's files directly.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"${PIP[@]}" install --no-deps --only-binary=:all: --platform manylinux_2_39_x86_64 \
  --python-version 3.12 --target "$SITE" --upgrade nvidia-resiliency-ext==0.6.0

# 4) The project itself, editable.
# --use-pep517: an editable build in this environment (setup.py develop would start a pip that fetches setuptools)
"${PIP[@]}" install --no-deps --no-build-isolation --use-pep517 -e "$ROOT"

echo "$want" > "$STAMP"
echo "[setup] done: $VENV"
