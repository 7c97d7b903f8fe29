#!/usr/bin/env bash
# saltjax against segmentation_models_pytorch on the same GPU, back to back.
#
#   bash benchmarks/run_gpu.sh                    # all stages, default batches
#   BATCH_SIZES="32 128" bash benchmarks/run_gpu.sh
#   STAGES="ours" bash benchmarks/run_gpu.sh      # one stage at a time, e.g.
#   STAGES="matched peer compare" RUN_ID=<same id> bash benchmarks/run_gpu.sh
#
# Stages, in order: ours (configs/fold.py's model: scSE in encoder and
# decoder), matched (ours with smp's exact architecture: scSE in the decoder
# only), peer (smp + PyTorch), compare (ours/peer and matched/peer tables).
# Timings are comparable only within one machine and session, so run every
# stage on the same machine; split them across calls (same RUN_ID) where one
# command may only run for a few minutes. Each stage compiles once per batch
# size for training and once for TTA inference: allow a few minutes each.
#
# Wheels missing on an offline machine (segmentation-models-pytorch,
# ml-collections) are installed from .whl/ when it exists: make it with
# benchmarks/fetch_wheels.sh where pip works, and carry it along.
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH_SIZES=${BATCH_SIZES:-"32 64 128 256 512"}
STAGES=${STAGES:-"ours matched peer compare"}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT=${RESULTS_DIR:-benchmarks/results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

ours=$OUT/gpu_saltjax_$RUN_ID.json
matched=$OUT/gpu_saltjax_matched_$RUN_ID.json
peer=$OUT/gpu_smp_$RUN_ID.json
for stage in $STAGES; do
  echo "=== $stage ($RUN_ID)"
  case $stage in
    ours)
      "$PYTHON" benchmarks/train_throughput.py --batch_sizes $BATCH_SIZES --output "$ours" ;;
    matched)
      "$PYTHON" benchmarks/train_throughput.py --batch_sizes $BATCH_SIZES --match_peer \
        --output "$matched" ;;
    peer)
      "$PYTHON" benchmarks/peer_smp_pytorch.py --batch_sizes $BATCH_SIZES --output "$peer" ;;
    compare)
      for mine in "$ours" "$matched"; do
        if [[ -f $mine && -f $peer ]]; then
          "$PYTHON" benchmarks/compare.py "$mine" "$peer" \
            --output "${mine%.json}_vs_smp.json" | tee "${mine%.json}_vs_smp.md"
        fi
      done ;;
    *) echo "unknown stage $stage (use ours, matched, peer, compare)" >&2; exit 2 ;;
  esac
done
