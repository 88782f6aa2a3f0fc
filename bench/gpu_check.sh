#!/usr/bin/env bash
# One call on a CUDA machine: the test suite, the kernel bandwidth table and the layer benchmark,
# logs and JSON under $OUT (or bench/out). Runs from the repository root without installing
# (the GPU machine has torch, triton and the test packages, and no network).
# Usage: bash bench/gpu_check.sh [tests] [kernels] [layers-conv] [layers-linear] [layers-compiled]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
stages=${*:-tests kernels layers-conv layers-linear layers-compiled}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/env.txt"
for stage in $stages; do
  case $stage in
    tests) python3 -m pytest -q tests 2>&1 | tee "$out/tests.log" ;;
    kernels)
      for dtype in bfloat16 float32; do
        python3 -m bench.kernels --dtype $dtype --out "$out/kernels_$dtype.json" 2>&1 | tee "$out/kernels_$dtype.log"
      done ;;
    layers-conv)
      python3 -m bench.run --verify --dtype bfloat16 --shapes resnet50,convnext,sd15 \
        --providers frozen,full_ft,torch_lora,peft_lora,lycoris,reference,triton,native --strategies auto,merged,bypass \
        --out "$out/layers_conv.json" 2>&1 | tee "$out/layers_conv.log" ;;
    layers-linear)
      python3 -m bench.run --verify --dtype bfloat16 --shapes linear \
        --providers frozen,full_ft,torch_lora,peft_lora,lycoris,reference,triton,native --strategies auto,merged,bypass \
        --out "$out/layers_linear.json" 2>&1 | tee "$out/layers_linear.log" ;;
    layers-compiled)  # torch.compile rows compile anew per row: auto only, one shape per family
      python3 -m bench.run --verify --dtype bfloat16 --quick --providers compiled --strategies auto \
        --out "$out/layers_compiled.json" 2>&1 | tee "$out/layers_compiled.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
