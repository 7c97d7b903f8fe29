"""The seed recipe (configs/fold.py) on a multi-host TPU pod slice.

Every host of the slice runs the same command; `jax.distributed.initialize()`
(called because config.distributed is True) finds the other hosts by itself
on a Cloud TPU VM. The mesh then spans every chip of the slice: the global
batch is split over all of them, BatchNorm statistics and gradients are
reduced over the whole slice, and each host reads only its own shard of each
fold's training images (the training, saltjax.training, gives each process
an equal slice of a fold's training ids, by jax.process_index()).

Set up once (ZONE, NAME, ACCELERATOR e.g. v4-32 or v5litepod-32):

  gcloud compute tpus tpu-vm create NAME --zone=ZONE \\
      --accelerator-type=ACCELERATOR --version=tpu-ubuntu2204-base
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="
      git clone REPO saltjax && cd saltjax &&
      pip install -r requirements.txt 'jax[tpu]==0.10.2' &&
      gcloud storage cp -r gs://BUCKET/tgs ~/tgs"

Each host needs the data on its own disk (or any path it can read as a local
path): every host loads the same files, then trains on its own shard.

Launch (the same command on every worker):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="
      cd saltjax && python main.py --config=configs/tpu.py
      --config.data_dir=~/tgs --workdir=/gcs/BUCKET/runs/tpu"

The workdir must be one directory that every host sees (checkpoints are
written by all hosts together): a gcsfuse mount of a bucket
(`gcsfuse BUCKET /gcs/BUCKET` on each worker) or a Filestore/NFS mount.
saltjax handles the workdir as a local path, so pass the mount point rather
than a gs:// URL. Without --config.data_dir every host generates the same
embedded synthetic dataset (a smoke test of the set-up).

A host lost mid-run (or one that never joins) ends the others with one line
and exit status 75, for a retry: the same command on every host resumes from
the last complete resume point (docs/faults.md: the timeouts to set).
"""

import math

from configs import fold

# The seed's global batch, to which its learning rate was tuned.
_SEED_BATCH_SIZE = 32


def get_config():
  config = fold.get_config()
  config.distributed = True
  # Compiling the ResNet50 U-Net step takes minutes on a pod slice; the
  # persistent cache makes later folds and restarts skip it. A local path is
  # per host; a gs://BUCKET/jax_cache URL is shared by hosts and runs alike.
  config.compilation_cache = "~/.cache/saltjax/jax_cache"

  # Divisible by every slice size up to 256 chips (8, 16, 32, ...), so the
  # same config runs unchanged on a v4-8 or a v5e-256.
  config.batch_size = 256
  config.eval_batch_size = 256
  config.predict.batch_size = 256
  config.model.dtype = "bfloat16"  # 'auto' picks it on TPU too; explicit here
  # The optimiser's moments split over the chips: compiled for a v5e-8 each
  # chip holds 1.2 GiB less and the step moves 4% fewer HBM bytes; for a
  # v5e-64, 1.3 GiB less and 11% fewer (benchmarks/README.md).
  config.state_sharding = "optimizer"

  # Adam at 8x the seed's batch: the square-root rule (the gradient noise
  # shrinks by sqrt(8)) rather than the linear one, which overshoots with
  # Adam. A short linear warm-up keeps the first large steps from wrecking
  # the freshly initialised BatchNorm statistics. A starting point, not tuned.
  config.optimizer.learning_rate = 3e-4 * math.sqrt(config.batch_size / _SEED_BATCH_SIZE)
  config.schedule.warmup_epochs = 2
  # SGDR cycles start after the warm-up: 2 more epochs keep all three of the
  # seed's cycle-end snapshots (epochs 52, 102, 152).
  config.num_epochs = 152

  # An epoch is only ~12 steps at this batch on the full TGS training set.
  config.log_every_steps = 10
  config.progress = False  # one log line per interval, not 8 progress bars
  return config
