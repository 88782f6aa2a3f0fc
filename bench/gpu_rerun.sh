#!/usr/bin/env bash
# Reruns what failed on the first device run: bash bench/gpu_rerun.sh [--dry-run] [--ids FILE] [--sample N]
# (bench/gpu_rerun.py says what it runs: about 3 minutes on an H200). Results under $OUT (default
# bench/out/gpu_rerun): triton.xml, native.xml, layers.json, gpu_rerun.log, summary.json. As
# bench/gpu_check.sh, Python packages the machine lacks are installed from wheels in .whl/ (if that
# folder travelled with the checkout) into a temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d /tmp/gpu_rerun_site.XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site" || echo "gpu_rerun: installing the wheels of .whl/ failed; going on without"
fi
exec python3 -m bench.gpu_rerun "$@"
