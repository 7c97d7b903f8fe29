#!/usr/bin/env bash
# One command that proves the GPU job, sized for a 15-minute device lease
# (about 9 minutes of wall time on one H100/H200, without TensorFlow):
#
#   (a) train images/s of our real step against smp + PyTorch at the same
#       batches, side by side in one run: 5 folds x 32 trained together, in
#       turn inside one program (the default) and vmapped, one model at 160
#       (= 5 x 32) and at 256, and one model at 32 (5 folds one after another
#       run at that rate);
#   (b) the whole configs/fold.py job at TGS size (4,000 train, 18,000 test,
#       flip TTA) on the synthetic data, epochs cut to $EPOCHS, end to end
#       through main.py (input_pipeline=device, use_tfds=False), with seconds
#       per epoch, compile seconds, prediction seconds and the projected
#       150-epoch total;
#   (c) one JSON and one markdown table under $RESULTS_DIR.
#
#   bash benchmarks/gpu_proof.sh            # on the GPU machine
#   bash benchmarks/gpu_proof.sh --tiny     # the same stages on a CPU, tiny sizes (a test runs it)
#
# Wheels the GPU image lacks (ml-collections, segmentation-models-pytorch) are
# installed from .whl/ when it exists: make it with benchmarks/fetch_wheels.sh
# where pip works, and carry it along (.whl/ is git-ignored).
# Stages: STAGES="ours peer job" (default all); each is bounded by a timeout
# so that a slow one cannot eat the others' time. PYTHON names the interpreter
# (default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0 TINY_FLAG=""
if [[ "${1:-}" == "--tiny" ]]; then TINY=1 TINY_FLAG=--tiny; fi
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-"ours peer job"}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$RESULTS_DIR" "$WORK"
export PYTHONUNBUFFERED=1
started=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2> /dev/null || true

if [[ $TINY == 1 ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  OURS_ARGS=(--tiny --batch_sizes 4 --folds_together "2x4:in_turn 2x4:vmap" --tta ""
    --steps 2 --repeats 2)
  PEER_ARGS=(--tiny --batch_sizes 4 --steps 2 --repeats 2)
  EPOCHS=${EPOCHS:-2}
  JOB_ARGS=(--config=configs/quick.py --config.num_folds=2 --config.synthetic.num_train=24
    --config.synthetic.num_test=8 --config.image_size=32 --config.batch_size=4
    --config.eval_batch_size=4 --config.predict.batch_size=8 --config.model.encoder_width=4
    --config.model.decoder_channels="(8,8,8,8,8)" --config.schedule.cycle_epochs=1)
  LIMIT_OURS=600 LIMIT_PEER=300 LIMIT_JOB=900
else
  OURS_ARGS=(--batch_sizes 32 160 256 --folds_together "5x32:in_turn 5x32:vmap" --tta ""
    --steps 10 --repeats 3)
  PEER_ARGS=(--batch_sizes 32 160 256 --steps 10 --repeats 3)
  EPOCHS=${EPOCHS:-20}
  JOB_ARGS=(--config=configs/fold.py --config.model.pretrained=""
    --config.synthetic.num_train=4000 --config.synthetic.num_test=18000
    --config.schedule.cycle_epochs=$((EPOCHS / 2)))
  LIMIT_OURS=${LIMIT_OURS:-170} LIMIT_PEER=${LIMIT_PEER:-130} LIMIT_JOB=${LIMIT_JOB:-330}
fi

ours=$RESULTS_DIR/gpu_proof_ours_$RUN_ID.json
peer=$RESULTS_DIR/gpu_proof_peer_$RUN_ID.json
job_log=$WORK/job.log
for stage in $STAGES; do
  echo "=== $stage ($(($(date +%s) - started)) s)"
  case $stage in
    ours)
      timeout "$LIMIT_OURS" "$PYTHON" benchmarks/train_throughput.py "${OURS_ARGS[@]}" \
        --compilation_cache "$WORK/jax_cache" --output "$ours" || echo "ours: exit $?" ;;
    peer)
      if "$PYTHON" -c "import torch, segmentation_models_pytorch" 2> /dev/null; then
        timeout "$LIMIT_PEER" "$PYTHON" benchmarks/peer_smp_pytorch.py "${PEER_ARGS[@]}" \
          --output "$peer" || echo "peer: exit $?"
      else
        echo "peer: torch or segmentation_models_pytorch missing; skipped"
      fi ;;
    job)
      # Every line stamped with the seconds since the job started.
      set +e
      timeout "$LIMIT_JOB" "$PYTHON" main.py "${JOB_ARGS[@]}" --workdir="$WORK/job" \
        --config.num_epochs="$EPOCHS" --config.use_tfds=False --config.input_pipeline=device \
        --config.progress=False --config.cache_dir="$WORK/cache" \
        --config.compilation_cache="$WORK/cache/jax_cache" 2>&1 \
        | "$PYTHON" benchmarks/gpu_proof.py stamp > "$job_log"
      echo "job: exit ${PIPESTATUS[0]}" >> "$job_log"
      set -e
      tail -n 3 "$job_log" ;;
    *) echo "unknown stage $stage (use ours, peer, job)" >&2; exit 2 ;;
  esac
done
"$PYTHON" benchmarks/gpu_proof.py summarize --ours "$ours" --peer "$peer" --job_log "$job_log" \
  --workdir "$WORK/job" --epochs "$EPOCHS" --output "$RESULTS_DIR/gpu_proof_$RUN_ID" $TINY_FLAG
echo "=== done ($(($(date +%s) - started)) s)"
