#!/usr/bin/env bash
# Pack the lock's packages that a bare PyTorch GPU image lacks (Megatron-Core/Bridge, Hydra, webdataset and what
# they import) from .venv/ into one .tar.gz, for machines that cannot reach a package index:
#   scripts/pack_extra_site.sh .gpu_site/site.tar.gz
#   PIXELLM_EXTRA_SITE=.gpu_site/site.tar.gz NEMO_PIXELLM_UNPINNED_OK=1 scripts/gpu_check.sh
# The list is what `import nemo_pixellm.train` and a training run needed beyond such an image (torch,
# transformers, numpy, PyYAML, PIL, ... are the image's own); a compiled package in it needs CPython 3.12 x86-64.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/pack_extra_site.sh OUT.tar.gz}"
SITE="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TOPS="megatron hydra omegaconf antlr4 webdataset braceexpand emerging_optimizers nvidia_resiliency_ext defusedxml
datasets multiprocess _multiprocess dill multistorageclient xattr _cffi_backend lark wcmatch bracex opentelemetry ryml
deprecation filetype modelopt modelopt_recipes pydantic pydantic_core typing_inspection annotated_types pulp jsonschema
referencing rpds jsonschema_specifications"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
for n in $TOPS; do
  for e in "$SITE/$n" "$SITE/$n.py" "$SITE"/$n.cpython-312*.so "$SITE/$n.libs"; do
    if [[ -e "$e" ]]; then cp -a "$e" "$STAGE/"; fi
  done
done
# Their dist-info too (version lookups): those whose RECORD lists one of the packed entries.
for d in "$SITE"/*.dist-info; do
  [[ -f "$d/RECORD" ]] || continue
  if cut -d, -f1 "$d/RECORD" | cut -d/ -f1 | sed 's/\.py$//; s/\.cpython-312.*\.so$//' | sort -u | grep -qxF -f <(tr ' ' '\n' <<<"$TOPS" | tr -s '\n'); then
    cp -a "$d" "$STAGE/"
  fi
done
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$STAGE/pulp/solverdir"   # solver binaries: imported by modelopt, never run here
mkdir -p "$(dirname "$OUT")"
tar -czf "$OUT" -C "$STAGE" .
echo "$OUT: $(du -h "$OUT" | cut -f1)"
