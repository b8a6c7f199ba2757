#!/usr/bin/env bash
# The GPU check of issues #10 and #25, on one GPU, in about 10 minutes:
#   DATASETS_DIR=/path/to/datasets bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. benchmarks/train_throughput.py --accelerator gpu: `python -m training fit` against the ceiling
#    (the same run trained by a bare loop on batches pre-made on the GPU), fp32 with and without
#    augmentation, then bf16-mixed with channels_last and torch.compile; medians of 3 alternating
#    repeats (targets fit/ceiling >= 0.9, >= 0.8 with augmentation);
# 2. configs/fashion_mnist_cnn.yaml on the GPU (target: test accuracy >= 0.915);
# 3. configs/fashion_mnist_best.yaml on the GPU with bf16-mixed (target: >= 0.94).
# Everything is logged to OUT_DIR (default: gpu_check_<date>/); the last lines sum it up.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python). If the Python
# lacks a package the project needs (albumentations, jsonargparse, lightning, bentoml, ...)
# and WHEELS names a folder of wheels carried to the machine, they are installed from it
# offline (pip --no-index --find-links "$WHEELS"); otherwise the script stops and names them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
OUT="${1:-gpu_check_$(date -u +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT"
: "${DATASETS_DIR:?set DATASETS_DIR to a folder holding FashionMNIST/raw}"
export DATASETS_DIR NO_ALBUMENTATIONS_UPDATE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'PY'
import importlib.util
mods = {"torch": "torch", "lightning": "lightning", "albumentations": "albumentations",
        "jsonargparse": "jsonargparse[signatures]", "torchmetrics": "torchmetrics", "safetensors": "safetensors",
        "tensorboard": "tensorboard", "matplotlib": "matplotlib", "yaml": "pyyaml", "cv2": "opencv-python-headless"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    echo "installing from $WHEELS: $missing"
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --find-links "$WHEELS" $missing
  else
    echo "error: $PY lacks: $missing (install them, or set WHEELS to a folder of wheels)" >&2
    exit 2
  fi
fi
"$PY" -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: no CUDA device here')
print(torch.cuda.get_device_name(0))" > "$OUT/device.txt"
cat "$OUT/device.txt"

start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "throughput, fp32 (with and without augmentation)"
"$PY" benchmarks/train_throughput.py --accelerator gpu --warmup 50 --batches 1000 --repeats 3 \
  | tee "$OUT/throughput_fp32.txt"
step "throughput, bf16-mixed, channels_last, torch.compile (no augmentation)"
"$PY" benchmarks/train_throughput.py --accelerator gpu --precision bf16-mixed --channels_last --compile \
  --warmup 50 --batches 1000 --repeats 3 --no_augment | tee "$OUT/throughput_bf16.txt"

export SVERTKA_OUTPUT_DIR="$OUT"
step "fashion_mnist_cnn on the GPU"
"$PY" -m training fit -c configs/fashion_mnist_cnn.yaml --trainer.accelerator gpu --trainer.devices 1 \
  --trainer.enable_progress_bar false > "$OUT/fashion_mnist_cnn.log" 2>&1
grep -E "Bundle:" "$OUT/fashion_mnist_cnn.log" | tail -1
step "fashion_mnist_best on the GPU, bf16-mixed"
"$PY" -m training fit -c configs/fashion_mnist_best.yaml --trainer.accelerator gpu --trainer.devices 1 \
  --trainer.precision bf16-mixed --trainer.enable_progress_bar false > "$OUT/fashion_mnist_best.log" 2>&1
grep -E "Bundle:" "$OUT/fashion_mnist_best.log" | tail -1
step "done"

echo
echo "summary ($(cat "$OUT/device.txt"), $(date -u +%F), $(( $(date +%s) - start )) s):"
grep -h -E "^\((a|b)\) " "$OUT"/throughput_*.txt
for name in fashion_mnist_cnn fashion_mnist_best; do
  "$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print(sys.argv[2], 'test/acc', m.get('test/acc'))" \
    "$OUT/artifacts/$name/bundle.json" "$name"
done
