"""The recipe around the model: schedules, optimisers, post-processing."""

import math

from flax import linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import fold
from saltjax.input_pipeline import tfdata
from saltjax.model import layers
from saltjax import parallel
from saltjax.inference import postprocess
from saltjax.training import optimizers
from saltjax.training import swa


def config_with(**schedule):
  config = fold.get_config()
  config.num_epochs = 12
  config.optimizer.learning_rate = 1e-3
  config.schedule.min_lr = 1e-5
  for k, v in schedule.items():
    config.schedule[k] = v
  return config


def sgdr(step, steps_per_epoch, base, min_lr, cycles):
  """SGDR by hand (Loshchilov & Hutter, eq. 5) for cycles given in epochs."""
  epoch_start = 0
  for length in cycles:
    start, end = epoch_start * steps_per_epoch, (epoch_start + length) * steps_per_epoch
    if step < end:
      t = (step - start) / (end - start)
      return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))
    epoch_start += length
  raise AssertionError("step past the cycles")


@pytest.mark.parametrize("cycle_mult, cycles", [(1.0, [4, 4, 4]), (2.0, [2, 4, 8])])
def test_cosine_restarts_match_sgdr(cycle_mult, cycles):
  config = config_with(cycle_epochs=cycles[0], cycle_mult=cycle_mult)
  lr = optimizers.create_learning_rate_fn(config, steps_per_epoch=5)
  for step in range(0, 5 * min(12, sum(cycles))):
    assert float(lr(step)) == pytest.approx(sgdr(step, 5, 1e-3, 1e-5, cycles), rel=1e-5)
  # a restart: back to the maximum at the first step of each cycle
  assert float(lr(5 * cycles[0])) == pytest.approx(1e-3)


def test_snapshot_epochs_are_cycle_ends():
  assert optimizers.cycle_end_epochs(config_with(cycle_epochs=4)) == [4, 8, 12]
  assert optimizers.cycle_end_epochs(config_with(cycle_epochs=5)) == [5, 10]
  assert optimizers.cycle_end_epochs(config_with(cycle_epochs=2, cycle_mult=2.0)) == [2, 6]
  assert optimizers.cycle_end_epochs(config_with(cycle_epochs=4, warmup_epochs=2)) == [6, 10]
  assert optimizers.cycle_end_epochs(config_with(name="constant")) == []


def test_warmup_then_cosine():
  config = config_with(cycle_epochs=4, warmup_epochs=2)
  lr = optimizers.create_learning_rate_fn(config, steps_per_epoch=10)
  assert float(lr(0)) == pytest.approx(1e-5, rel=1e-5)
  assert float(lr(10)) == pytest.approx((1e-5 + 1e-3) / 2, rel=1e-5)
  assert float(lr(20)) == pytest.approx(1e-3, rel=1e-5)
  assert float(lr(20 + 20)) == pytest.approx(sgdr(20, 10, 1e-3, 1e-5, [4]), rel=1e-5)


@pytest.mark.parametrize("cycle_mult, cycles", [(1.0, [3, 3]), (2.0, [2, 4, 8])])
def test_warm_restarts_land_on_the_cycle_ends(cycle_mult, cycles):
  # Warm-up of 2 epochs, then SGDR cycles counted from the end of the warm-up:
  # the rate is at min_lr at every cycle end (where the snapshots are taken)
  # and back at the peak on the first step of the next epoch.
  warmup, spe, base, min_lr = 2, 10, 1e-3, 1e-5
  config = config_with(cycle_epochs=cycles[0], cycle_mult=cycle_mult, warmup_epochs=warmup)
  config.num_epochs = warmup + sum(cycles)
  ends = optimizers.cycle_end_epochs(config)
  assert ends == [warmup + sum(cycles[: i + 1]) for i in range(len(cycles))]
  lr = optimizers.create_learning_rate_fn(config, steps_per_epoch=spe)
  for step in range(warmup * spe):  # linear warm-up from min_lr to the peak
    assert float(lr(step)) == pytest.approx(
        min_lr + (base - min_lr) * step / (warmup * spe), rel=1e-5
    )
  for step in range(warmup * spe, config.num_epochs * spe):
    assert float(lr(step)) == pytest.approx(
        sgdr(step - warmup * spe, spe, base, min_lr, cycles), rel=1e-5
    ), step
  one_step = 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (1 - 1 / (min(cycles) * spe))))
  for end in ends:
    last = end * spe - 1  # the step whose weights the snapshot of epoch `end` keeps
    assert float(lr(last)) < min_lr + one_step * 1.01
    if end < config.num_epochs:
      assert float(lr(end * spe)) == pytest.approx(base, rel=1e-5)  # restart


def test_warm_restarts_worked_example():
  # warm-up 2, cycles of 3, 8 epochs: snapshots at the ends of epochs 5 and
  # 8, a restart on the first step of epoch 6 (1-based, as in the logs).
  config = config_with(cycle_epochs=3, warmup_epochs=2)
  config.num_epochs = 8
  assert optimizers.cycle_end_epochs(config) == [5, 8]
  lr = optimizers.create_learning_rate_fn(config, steps_per_epoch=4)
  at_end_of_epoch = lambda e: float(lr(4 * e - 1))
  assert at_end_of_epoch(5) < 1e-4 and at_end_of_epoch(8) < 1e-4
  assert float(lr(4 * 5)) == pytest.approx(1e-3)  # first step of epoch 6


def test_step_and_constant():
  lr = optimizers.create_learning_rate_fn(
      config_with(name="step", step_epochs=3, step_factor=0.1), 10
  )
  assert [float(lr(s)) for s in (0, 29, 30, 59, 60)] == pytest.approx(
      [1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
  )
  lr = optimizers.create_learning_rate_fn(config_with(name="constant"), 10)
  assert float(lr(1000)) == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_optimisers_step_downhill(name):
  config = config_with(name="constant")
  config.optimizer.name = name
  config.optimizer.learning_rate = 0.05
  config.optimizer.grad_clip = 1.0
  config.optimizer.weight_decay = 1e-4
  tx = optimizers.create_optimizer(config, lambda step: 0.05)
  params = {"w": np.array([3.0, -2.0], np.float32)}
  state = tx.init(params)
  loss = lambda p: float(np.sum(p["w"] ** 2))
  before = loss(params)
  for _ in range(20):
    grads = {"w": 2 * params["w"]}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < before


def test_min_area_and_gate():
  probs = np.zeros((3, 101, 101), np.float32)
  probs[0, :5, :5] = 0.9  # 25 pixels
  probs[1, :20, :20] = 0.9  # 400 pixels
  probs[2, :20, :20] = 0.9
  masks = postprocess.apply_postprocessing(probs, 0.5, min_area=100)
  assert [int(m.sum()) for m in masks] == [0, 400, 400]
  masks = postprocess.apply_postprocessing(
      probs, 0.5, 0, class_probs=np.array([0.9, 0.9, 0.1]), gate=0.5
  )
  assert [int(m.sum()) for m in masks] == [25, 400, 0]


def test_tuned_threshold_maximises_the_oof_metric():
  truth = np.zeros((2, 101, 101), np.uint8)
  truth[0, :50] = 1
  probs = np.zeros((2, 101, 101), np.float32)
  probs[0, :50] = 0.7  # salt predicted at 0.7 ...
  probs[1, :50] = 0.45  # ... an empty image with a 0.45 blob
  config = fold.get_config()
  choice = postprocess.tune(truth, probs, None, config)
  assert 0.45 <= choice["threshold"] < 0.7  # both images right only in between
  best = max(s for _, s in choice["threshold_sweep"])
  assert best == 1.0


class _TwoNorms(nn.Module):
  """BatchNorm, a 1x1 conv, BatchNorm: the second norm sees the first's output."""

  @nn.compact
  def __call__(self, x, train=False):
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=layers.BATCH_NORM_MOMENTUM, epsilon=1e-5, name=name
    )
    x = norm("bn1")(x)
    x = nn.Conv(2, (1, 1), use_bias=False, name="conv")(x)
    return norm("bn2")(x)


def test_swa_batch_stats_are_the_mean_over_one_pass():
  # torch.optim.swa_utils.update_bn: reset the statistics, then the plain mean
  # over one pass of every batch's mean and (here biased, flax's) variance.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 101, 101), dtype=np.uint8)
  masks = np.zeros((20, 101, 101), np.uint8)
  for_epoch = tfdata.train_dataset(
      images,
      masks,
      batch_size=6,
      image_size=32,
      resize_mode="resize",
      augment_spec="hflip|brightness(0.2)",
      seed=1,
  )
  batches = [b["image"].astype(np.float64) for b in tfdata.epoch_iterator(for_epoch, 4)]
  assert len(batches) == 3  # 20 // 6, the remainder dropped
  kernel = np.array([[1.0, -2.0]])
  scale1, bias1 = 1.5, 0.25
  variables = {
      "params": {
          "bn1": {"scale": np.full(1, scale1, np.float32), "bias": np.full(1, bias1, np.float32)},
          "conv": {"kernel": kernel.reshape(1, 1, 1, 2).astype(np.float32)},
          "bn2": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)},
      },
      # The averaged statistics going in, deliberately far off: they must go.
      "batch_stats": {
          "bn1": {"mean": np.full(1, 5.0, np.float32), "var": np.full(1, 7.0, np.float32)},
          "bn2": {"mean": np.full(2, -3.0, np.float32), "var": np.full(2, 9.0, np.float32)},
      },
  }

  expected = {"bn1": {"mean": [], "var": []}, "bn2": {"mean": [], "var": []}}
  for x in batches:  # by hand, in float64
    m, v = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    expected["bn1"]["mean"].append(m)
    expected["bn1"]["var"].append(v)
    y = ((x - m) / np.sqrt(v + 1e-5) * scale1 + bias1) @ kernel  # (B, H, W, 2)
    expected["bn2"]["mean"].append(y.mean(axis=(0, 1, 2)))
    expected["bn2"]["var"].append(y.var(axis=(0, 1, 2)))

  mesh = parallel.create_mesh()
  one_pass = lambda epoch: (
      parallel.global_from_local(b, mesh)["image"] for b in tfdata.epoch_iterator(for_epoch, epoch)
  )
  got = swa.recompute_batch_stats(None, _TwoNorms(), variables, one_pass, mesh, 4)
  for name in ("bn1", "bn2"):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(
          got["batch_stats"][name][stat],
          np.mean(expected[name][stat], axis=0),
          rtol=1e-5,
          atol=1e-6,
      )
  # The (averaged) weights are kept as they are.
  for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(a, b)
