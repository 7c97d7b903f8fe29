"""The seed recipe's code path at CPU-demo size: tiny encoder, 64x64 input, 3 folds.

On a 2-core CPU the whole job (train 3 folds, predict with flip TTA, write the
submission) takes a few minutes on the embedded synthetic dataset. The folds
train one after another here: on a CPU, folds trained together (a vmap over the
weights, which makes every conv a grouped one) are slower to compile and to run
than the same folds in turn (docs/training.md); the fold axis is
for accelerators, which batch 32 leaves idle.
"""

from configs import fold


def get_config():
  config = fold.get_config()
  config.synthetic.num_train = 600
  config.synthetic.num_test = 200
  config.num_folds = 3
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.encoder_width = 8
  config.model.decoder_channels = (32, 16, 16, 8, 8)
  config.model.pretrained = ""  # no ImageNet weights fit the tiny encoder
  config.model.scse_reduction = 4
  config.image_size = 64
  config.num_epochs = 16
  config.batch_size = 32
  config.parallel_folds = 1
  config.optimizer.learning_rate = 3e-3
  config.schedule.cycle_epochs = 8
  config.schedule.min_lr = 1e-4
  config.log_every_steps = 20
  return config
