#!/usr/bin/env bash
# The prepared accelerator check (issue 13, item 6): InternVL3-1B and 8B shapes, random bfloat16 weights, ours
# beside transformers (SDPA, bfloat16, static cache); one JSON. About 8 minutes on one H200; installs nothing.
#   bash benchmarks/device_check.sh [OUT.json] [extra options of python -m internvl_jax.device_check]
# Run from the repository root (this package is imported from it, not installed). docs/benchmarks.md says more.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/benchmarks/device-check.json}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# jax takes 75% of GPU memory up front by default; torch needs its share of the same GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
"$PY" -c "import jax, torch, transformers, flax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"
start=$(date +%s)
if ! timeout "${DEVICE_CHECK_TIMEOUT:-470}" "$PY" -m internvl_jax.device_check --out "$out" "$@"; then
  # cuDNN's flash attention (the GPU default) has never run in this project: if the check failed early, once more
  # with XLA's attention, in what is left of the time, so that the run still brings figures back.
  left=$(( ${DEVICE_CHECK_TIMEOUT:-470} - ($(date +%s) - start) ))
  if [ "$left" -gt 120 ]; then
    echo "device check failed; again with --attention xla (${left}s left)" >&2
    timeout "$left" "$PY" -m internvl_jax.device_check --out "${out%.json}-xla.json" --attention xla "$@"
  else
    exit 1
  fi
fi
