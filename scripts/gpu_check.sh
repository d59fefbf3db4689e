#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): what only a GPU can show, one table. Arguments go to it (--dry-run,
# --out DIR, --only NAME...). Python: .venv/ where `make setup` made one, else python3 (a GPU image built from the
# Dockerfile). PIXELLM_EXTRA_SITE: a folder, or a .tar.gz of one, of packages the image lacks (copied from a
# machine with the lock installed), put on PYTHONPATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${PIXELLM_EXTRA_SITE:-}" ]]; then
  site="$PIXELLM_EXTRA_SITE"
  if [[ "$site" == *.tar.gz ]]; then
    mkdir -p /tmp/pixellm_extra_site && tar -xzf "$site" -C /tmp/pixellm_extra_site && site=/tmp/pixellm_extra_site
  fi
  export PYTHONPATH="$PYTHONPATH:$site"
fi
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
