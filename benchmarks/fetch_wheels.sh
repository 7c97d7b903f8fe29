#!/usr/bin/env bash
# Downloads into .whl/ the wheels benchmarks/run_gpu.sh needs on a GPU image
# without internet that has PyTorch, timm, torchvision, huggingface_hub,
# safetensors and JAX but not these. All are pure Python (py3-none-any).
# .whl/ is git-ignored; carry it to the GPU machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: -d .whl \
  segmentation-models-pytorch==0.6.0 ml-collections==1.1.0
ls -l .whl
