#!/usr/bin/env bash
# Reruns what failed on the first device run: bash bench/gpu_rerun.sh [--dry-run] [--sample N] [--budget SECONDS]
# (bench/gpu_rerun.py says what it runs: about 3 minutes on an H200). Results under $OUT (default
# bench/out/gpu_rerun): layers.json, triton.xml, native.xml, gpu_rerun.log, summary.json. The setup
# is bench/gpu_check.sh's (Python packages the machine lacks installed from wheels in .whl/).
GPU_SCRIPT_MODULE=bench.gpu_rerun exec bash "$(dirname "$0")/gpu_check.sh" "$@"
