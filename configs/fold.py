"""The seed recipe: ResNet50 U-Net with scSE, 5 stratified folds, then predict.

python main.py --config=configs/fold.py                 # every fold, then predict
python main.py --config=configs/fold.py --config.fold=2 # fold 2 only
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # 'train' (then predict when every fold is done); configs/predict.py and
  # configs/segment.py set 'predict' and 'segment'.
  config.mode = "train"
  config.seed = 0

  _data(config)
  _input(config)
  config.model = _model()
  _training(config)
  config.optimizer = _optimizer()
  config.schedule = _schedule()
  # Epochs count from 1, as in the logs.
  config.swa_from_epoch = -1  # stochastic weight averaging from this epoch on (-1: off)

  config.loss = _loss()
  config.nonfinite = "stop"  # on a non-finite loss/gradient: 'stop' or 'skip' the step

  config.predict = _predict()
  _process(config)
  config.pseudo_label = _pseudo_label()
  _logging(config)
  return config


def _data(config: ml_collections.ConfigDict) -> None:
  """Which data, and its folds."""
  # Data: a directory in the Kaggle TGS layout, or '' for the embedded
  # synthetic dataset (generated once into cache_dir).
  config.data_dir = ""
  config.cache_dir = "~/.cache/saltjax"
  config.synthetic = ml_collections.ConfigDict(dict(num_train=1000, num_test=500, seed=0))
  config.use_tfds = True  # read through the tensorflow-datasets builders

  # Folds: stratified K-fold; fold=-1 trains every fold (together by default:
  # parallel_folds=0, below), then predicts.
  config.num_folds = 5
  config.fold = -1
  config.stratify_by = "coverage"  # or 'depth'


def _input(config: ml_collections.ConfigDict) -> None:
  """The model's input: size, augmentation, where batches are made."""
  # Input: 101 -> image_size by 'resize' (bilinear) or 'pad' (reflect).
  config.image_size = 128
  config.resize_mode = "resize"
  config.augment = (
      "hflip"  # ops joined by '|': hflip vflip shift(n) scale(s) brightness(d) contrast(d)
  )
  # Where batches are made: 'tfdata' (host CPUs) or 'device' (decoded data on
  # the accelerator, augmented in JAX: saltjax/input_pipeline/on_device.py; no TensorFlow).
  config.input_pipeline = "tfdata"


def _model() -> ml_collections.ConfigDict:
  """The U-Net: ResNet encoder, scSE, decoder, heads, weights."""
  return ml_collections.ConfigDict(
      dict(
          stage_sizes=(3, 4, 6, 3),  # ResNet50
          encoder_width=64,
          in_channels=1,
          scse_encoder=True,
          scse_decoder=True,
          scse_reduction=16,
          decoder_channels=(256, 128, 64, 32, 16),
          upsample="nearest",
          hypercolumn=False,
          deep_supervision=False,
          classifier=False,
          # The last decoder block and the head on 2x2 space-to-depth maps: the same
          # parameters and outputs, fewer padded lanes on a TPU. 'auto': on TPUs only.
          final_block="auto",
          # ImageNet weights: 'imagenet' (timm/resnet50.tv_in1k, downloaded once into
          # cache_dir/pretrained/), another timm/resnet50.<tag>, a local
          # .safetensors/.npz/.pth file, or '' to train from scratch.
          pretrained="imagenet",
          dtype="auto",  # bfloat16 on GPU/TPU, float32 on CPU
      )
  )


def _training(config: ml_collections.ConfigDict) -> None:
  """Epochs, batches, folds trained together, checkpoint cadence."""
  config.num_epochs = 150
  config.batch_size = 32  # per fold: the global batch of each fold model, split over every device
  # Folds trained together by one jitted step over a leading fold axis (each
  # with its own weights, optimiser state and batches): 0 = every fold at once,
  # so batch 32 per fold becomes 160 images per step at 5 folds.
  config.parallel_folds = 0
  # How one program trains them: 'in_turn' (a loop over the folds inside the
  # program: each fold an ordinary step) or 'vmap' (every fold at once: grouped
  # convs). In turn moves less HBM traffic a step on a TPU (docs/training.md).
  config.fold_strategy = "in_turn"
  # Where the train state lives on several devices: 'replicated' keeps every
  # leaf on every device; 'optimizer' splits the optimiser's moments over
  # them (each device updates its share of the weights: less memory per
  # device, about the same traffic; docs/training.md). One device: the same.
  config.state_sharding = "replicated"
  # The resume point (and best/snapshot/SWA models) is written at most this
  # often, at the end of training and on SIGTERM; 0 = every epoch.
  config.checkpoint_every_seconds = 300
  config.eval_batch_size = 64


def _optimizer() -> ml_collections.ConfigDict:
  """The optimiser."""
  return ml_collections.ConfigDict(
      dict(
          name="adam",  # adam, adamw, sgd, rmsprop
          learning_rate=3e-4,
          weight_decay=0.0,
          momentum=0.9,
          nesterov=True,
          grad_clip=0.0,  # global-norm clipping when > 0
      )
  )


def _schedule() -> ml_collections.ConfigDict:
  """The learning-rate schedule."""
  return ml_collections.ConfigDict(
      dict(
          name="cosine_restarts",  # cosine_restarts, constant, step, plateau
          cycle_epochs=50,  # SGDR cycle length; a snapshot is kept at each cycle end
          cycle_mult=1.0,
          min_lr=1e-6,
          warmup_epochs=0,
          step_epochs=30,  # 'step': multiply by step_factor every step_epochs
          step_factor=0.1,
          plateau_patience=5,  # 'plateau': epochs without a better validation score
          plateau_factor=0.5,
      )
  )


def _loss() -> ml_collections.ConfigDict:
  """The training loss (one stage or two) and its heads' weights."""
  return ml_collections.ConfigDict(
      dict(
          name="bce_dice",  # bce, dice, bce_dice, lovasz, lovasz_elu, lovasz_symmetric(_elu)
          bce_weight=1.0,
          dice_weight=1.0,
          second_name="lovasz",  # two-stage training: switch to this loss ...
          second_from_epoch=-1,  # ... from this epoch on (-1: one stage)
          deep_supervision_weight=0.1,
          classifier_weight=0.05,
      )
  )


def _predict() -> ml_collections.ConfigDict:
  """Prediction: TTA, checkpoints, threshold, minimum area."""
  return ml_collections.ConfigDict(
      dict(
          tta="hflip",  # none, hflip, vflip, hflip+vflip, shift, hflip+shift
          # latest, best, snapshots (cycle ends), swa, or several joined by '+'
          # (e.g. best+snapshots): each fold's models in the ensemble.
          checkpoints="snapshots",
          threshold=-1.0,  # -1: tuned on the out-of-fold predictions
          min_area=-1,  # -1: tuned on the out-of-fold predictions; 0: off
          classifier_gate=True,  # use the empty-mask head when the model has one
          batch_size=64,
      )
  )


def _process(config: ml_collections.ConfigDict) -> None:
  """A multi-host job, and the compilation cache."""
  # A multi-host job (TPU pod slice, SLURM cluster): every process calls
  # jax.distributed.initialize() and the mesh spans every host's devices.
  config.distributed = False
  # When a process of such a job is lost (or the coordinator, process 0), the
  # others stop within this many seconds + ~30 s, with exit status 75 (retry)
  # and one line naming it (docs/faults.md); JAX's default is 100.
  config.distributed_heartbeat_timeout_seconds = 100
  # How long the processes wait for every one of them to join; then exit 75.
  config.distributed_initialization_timeout_seconds = 300
  # JAX's persistent compilation cache: later folds and runs skip compiling.
  config.compilation_cache = "~/.cache/saltjax/jax_cache"
  # A Cloud TPU slice (v5e-8, v4-32, v5litepod-16, v6e-8, ...) to compile the
  # job for on this machine instead of training: memory per chip and the
  # roofline bound in workdir/compile_report.{json,md} (docs/compile_only.md).
  config.compile_for = ""


def _pseudo_label() -> ml_collections.ConfigDict:
  """The pseudo-label round (off by default)."""
  # Pseudo-labelling: after every fold is trained and predicted, confident test
  # images (at most max_uncertain_fraction of their pixels inside [low, high])
  # join each fold's training set for a second round, whose ensemble then
  # makes the submission.
  return ml_collections.ConfigDict(
      dict(enabled=False, low=0.2, high=0.8, max_uncertain_fraction=0.005)
  )


def _logging(config: ml_collections.ConfigDict) -> None:
  """Logs, a profile, progress bars."""
  config.log_every_steps = 50
  # A jax.profiler trace of this epoch (counted from 1) into the workdir's
  # TensorBoard directory, to read where a slow epoch's time goes; 0 = off.
  config.profile_epoch = 0
  config.progress = True  # progress bars: process 0's alone, when stderr is a terminal
