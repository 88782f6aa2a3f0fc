#!/usr/bin/env bash
# The device check in one command: bash bench/gpu_check.sh [--dry-run] [--budget SECONDS] [stage ...]
# (bench/gpu_check.py says what each stage does and how long it should take: about 8 minutes on an
# H100/H200). Results under $OUT (default bench/out/gpu_check): one JSON per stage as it ends,
# gpu_check.log, summary.json. The machine needs no network: Python packages it lacks are installed
# from wheels in .whl/ (if that folder travelled with the checkout) into a temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site" || echo "gpu_check: installing the wheels of .whl/ failed; going on without"
fi
exec python3 -m "${GPU_SCRIPT_MODULE:-bench.gpu_check}" "$@"  # bench/gpu_rerun.sh sets bench.gpu_rerun
