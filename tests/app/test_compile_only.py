"""`--config.compile_for=<slice>`: the job compiled for a TPU slice on this CPU, nothing trained.

The compiles are of tiny models (XLA's TPU compiler takes its time even so);
the full-size ones are benchmarks/compile_tpu.py's. The roofline arithmetic
and the slice table are checked on hand-set numbers and on Cloud TPU's own
documented slice shapes.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from saltjax.app import compile_report
from saltjax.app import tpu_slices
from saltjax.errors import ConfigError
from tests.conftest import tiny_config

REPORT_KEYS = {
    "accelerator",
    "topology",
    "chips",
    "hosts",
    "hbm_bytes_per_chip",
    "peak_flops_per_chip",
    "hbm_bandwidth_per_chip",
    "bound_seconds_epoch",
    "bound_seconds_job",
    "programs",
}
PROGRAM_KEYS = {
    "name",
    "kind",
    "compile_seconds",
    "memory_per_chip",
    "flops_per_chip",
    "bytes_per_chip",
    "images_per_chip",
    "bound_seconds",
}

# ------------------------------------------------------------- arithmetic ---


def test_the_bound_is_the_slower_of_arithmetic_and_traffic():
  # 2 TFLOP at 1 PFLOP/s is 2 ms; 1 GB at 1 TB/s is 1 ms: arithmetic binds.
  assert compile_report.bound_seconds(2e12, 1e9, 1e15, 1e12) == pytest.approx(2e-3)
  # 1 GFLOP is 1 us; 3 GB at 1 TB/s is 3 ms: traffic binds.
  assert compile_report.bound_seconds(1e9, 3e9, 1e15, 1e12) == pytest.approx(3e-3)


def _program(name, kind, flops, nbytes, images, per_epoch, per_job, total=100):
  from saltjax.app.compile_programs import ProgramCost

  memory = {"argument": 10, "output": 20, "temp": 30, "code": 40, "total": total}
  return ProgramCost(
      name, kind, 1.0, memory, flops, 3 * nbytes, images, per_epoch, per_job,
      hbm_bytes_per_chip=nbytes,
  )  # fmt: skip


def test_the_epoch_and_job_bounds_are_calls_times_program_bounds():
  spec = tpu_slices.slice_spec("v5e-8")  # 197 TFLOP/s, 819 GB/s
  step = _program("step", "train", 197e9, 819e6 * 2, 40, per_epoch=10, per_job=1500)  # 2 ms
  end = _program("end", "epoch_end", 197e10, 819e6, 100, per_epoch=1, per_job=150)  # 10 ms
  predict = _program("predict", "predict", 0.0, 819e6 * 4, 8, per_epoch=0, per_job=30)  # 4 ms
  report = compile_report.build(spec, [step, end, predict], {}, {})
  assert report["bound_seconds_epoch"] == pytest.approx(10 * 2e-3 + 10e-3)
  assert report["bound_seconds_job"] == pytest.approx(1500 * 2e-3 + 150 * 10e-3 + 30 * 4e-3)
  rows = {p["name"]: p for p in report["programs"]}
  # The bound reads HBM's bytes; bytes_per_image counts every memory's.
  assert rows["step"]["hbm_bytes_per_image"] == pytest.approx(819e6 * 2 / 40)
  assert rows["step"]["bytes_per_image"] == pytest.approx(3 * 819e6 * 2 / 40)
  assert rows["end"]["flops_per_image"] == pytest.approx(197e10 / 100)
  assert REPORT_KEYS <= set(report) and all(PROGRAM_KEYS <= set(p) for p in report["programs"])
  table = compile_report.markdown(report)
  assert "| step |" in table and "bound" in table and "not a measurement" in table


def test_a_program_over_the_chips_hbm_is_refused_naming_it():
  spec = tpu_slices.slice_spec("v5e-8")
  over = 17 * 2**30
  programs = [
      _program("the train step", "train", 1.0, 1.0, 1, 1, 1, total=over),
      _program("the forward", "predict", 1.0, 1.0, 1, 0, 1),
  ]
  with pytest.raises(ConfigError) as e:
    compile_report.check_fits(compile_report.build(spec, programs, {}, {}))
  message = str(e.value)
  assert "the train step needs 17.00 GiB per chip, over the 16.00 GiB of HBM of a v5e-8 chip" in (
      message
  )
  assert "the forward" not in message


# -------------------------------------------------------------- the slices ---


@pytest.mark.parametrize(
    "name, topology, chips, hosts, hbm_gib",
    [
        # Cloud TPU's documented slices (v4 and v5p names count TensorCores).
        ("v4-8", "v4:2x2x1", 4, 1, 32),
        ("v4-32", "v4:2x2x4", 16, 4, 32),
        ("v5litepod-16", "v5e:4x4", 16, 4, 16),
        ("v5e-16", "v5e:4x4", 16, 4, 16),
        ("v5e-8", "v5e:2x4", 8, 1, 16),
        ("v5p-8", "v5:2x2x1", 4, 1, 95),
        ("v5p-128", "v5:4x4x4", 64, 16, 95),
        ("v6e-8", "v6e:2x4", 8, 1, 32),
        ("v6e-256", "v6e:16x16", 256, 64, 32),
    ],
)
def test_cloud_tpu_names_map_to_their_slices(name, topology, chips, hosts, hbm_gib):
  spec = tpu_slices.slice_spec(name)
  assert (spec.topology, spec.chips, spec.hosts) == (topology, chips, hosts)
  assert spec.hbm_bytes_per_chip == hbm_gib * 2**30


def test_the_compile_only_devices_are_every_hosts_chips():
  spec = tpu_slices.slice_spec("v4-32")
  devices = tpu_slices.compile_only_devices(spec)
  assert len(devices) == 16
  assert sorted({d.process_index for d in devices}) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["v5e-3", "v4-6", "tpu-8", "v5p"])
def test_an_unknown_slice_is_a_config_error_naming_the_option(name, tmp_path, capsys):
  from saltjax.app import run as run_lib

  config = tiny_config(str(tmp_path / "cache"), str(tmp_path / "jax"), compile_for=name)
  assert run_lib.main(config, str(tmp_path / "run")) == 1
  err = capsys.readouterr().err
  assert f"config.compile_for={name!r}" in err
  assert not (tmp_path / "run").exists()  # nothing loaded, compiled or written


# ------------------------------------------------------- tiny compiled jobs ---

# Folds in turn (parallel_folds=1): a vmapped fold axis takes XLA's TPU
# compiler minutes even at this size. Four images a chip on v5e-4: every
# program of a job that trains and predicts.
ONE_HOST = dict(
    compile_for="v5e-4",
    parallel_folds=1,
    batch_size=16,
    eval_batch_size=8,
    **{"predict.batch_size": 8},
)
# v5e-16: four hosts of four chips, one image a chip; one fold, so the job
# does not predict; its 24 held-out images in one batch (no loop to scale).
# The plain last decoder block ('auto' is space_to_depth on a TPU, as the
# one-host job has it): both forms compile for a TPU slice here.
MULTI_HOST = dict(
    compile_for="v5e-16",
    fold=0,
    batch_size=16,
    eval_batch_size=32,
    **{"model.final_block": "plain"},
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, data_cache, compile_cache):
  from saltjax.app import run as run_lib

  root = tmp_path_factory.mktemp("compile_only")
  reports = {}
  for name, overrides in {"one_host": ONE_HOST, "multi_host": MULTI_HOST}.items():
    config = tiny_config(data_cache, compile_cache, **overrides)
    assert run_lib.main(config, str(root / name)) == 0, name
    reports[name] = json.loads((root / name / compile_report.REPORT_JSON).read_text())
    for p in reports[name]["programs"]:
      print(f"{name}: {p['name']} compiled in {p['compile_seconds']:.1f} s")
    assert (root / name / compile_report.REPORT_MD).read_text().startswith("# ")
  return reports


def test_a_tiny_job_compiles_every_program_for_a_one_host_slice(compiled):
  report = compiled["one_host"]
  assert REPORT_KEYS <= set(report)
  assert (report["accelerator"], report["chips"], report["hosts"]) == ("v5e-4", 4, 1)
  assert report["topology"] == "v5e:2x2"
  programs = report["programs"]
  assert [p["kind"] for p in programs] == ["train", "epoch_end", "predict"]
  for p in programs:
    assert PROGRAM_KEYS <= set(p)
    m = p["memory_per_chip"]
    assert m["total"] > 0 and m["argument"] > 0 and m["code"] > 0
    assert m["total"] <= m["argument"] + m["output"] + m["temp"] + m["code"]
    assert p["flops_per_chip"] > 0 and p["bytes_per_chip"] > 0
    expected = max(
        p["flops_per_chip"] / report["peak_flops_per_chip"],
        p["hbm_bytes_per_chip"] / report["hbm_bandwidth_per_chip"],
    )
    assert p["bound_seconds"] == pytest.approx(expected)
    # Every byte moved is in HBM or on chip.
    moved = p["hbm_bytes_per_chip"] + p["on_chip_bytes_per_chip"]
    assert p["bytes_per_chip"] == pytest.approx(moved)
    if not p["loop_trips"]:  # XLA counts the same, by its own rules for fusions
      assert moved == pytest.approx(p["xla_bytes_accessed_per_chip"], rel=0.1)
    # Both splits of the HBM traffic count the loops as the total does.
    for split in ("hbm_bytes_by_kind", "hbm_bytes_by_phase"):
      assert sum(p[split].values()) == pytest.approx(p["hbm_bytes_per_chip"]), split
    assert p["estimated_cycles_per_chip"] > 0  # the TPU compiler's own estimate
  train, end, predict = programs
  # One fold's 16 images over 4 chips; 24 held-out images a fold in 3 batches of 8.
  assert train["images_per_chip"] == 4
  assert end["images_per_chip"] == 3 * 8 / 4 and end["loop_trips"]["validation"] == 3
  assert predict["images_per_chip"] == 2
  assert report["job"]["model_dtype"] == "bfloat16"  # 'auto' on a TPU
  assert report["job"]["model_final_block"] == "space_to_depth"  # likewise
  assert report["job"]["fold_groups"] == [[0], [1]]
  steps = report["job"]["steps_per_epoch"]
  assert steps == 24 // 16
  # The first group's first epoch; every group's 3 epochs.
  assert train["calls_per_epoch"] == steps and train["calls_per_job"] == steps * 3 * 2
  assert (end["calls_per_epoch"], end["calls_per_job"]) == (1, 3 * 2)
  # Each fold's snapshots (cycle ends of 2 epochs in 3: one) on 24 held-out
  # and 12 test images, batches of 8: 2 folds x (3 + 2) calls.
  assert predict["calls_per_job"] == 2 * (3 + 2)
  assert report["bound_seconds_job"] == pytest.approx(
      sum(p["bound_seconds"] * p["calls_per_job"] for p in programs)
  )
  assert report["versions"]["libtpu"]


def test_a_tiny_job_compiles_for_a_multi_host_slice(compiled):
  report = compiled["multi_host"]
  assert (report["chips"], report["hosts"], report["topology"]) == (16, 4, "v5e:4x4")
  # fold=0 trains and does not predict: the train step and the epoch's end.
  assert [p["kind"] for p in report["programs"]] == ["train", "epoch_end"]
  assert report["programs"][0]["images_per_chip"] == 1
  assert report["programs"][1]["loop_trips"] == {"validation": 1}
  assert report["job"]["model_final_block"] == "plain"  # as configured


def test_memory_per_chip_grows_with_the_batch(compiled):
  one, four = (compiled[k]["programs"][0] for k in ("multi_host", "one_host"))
  assert (one["images_per_chip"], four["images_per_chip"]) == (1, 4)
  # The same replicated weights and optimiser state (the arguments differ by
  # the batch alone); four times the activations.
  grown = four["memory_per_chip"]["argument"] - one["memory_per_chip"]["argument"]
  assert 0 < grown < 0.1 * one["memory_per_chip"]["argument"]
  assert four["memory_per_chip"]["temp"] > one["memory_per_chip"]["temp"]
  assert four["memory_per_chip"]["total"] > one["memory_per_chip"]["total"]
  assert four["flops_per_chip"] > 3 * one["flops_per_chip"]


def test_an_impossible_batch_is_refused_naming_the_program(tmp_path, data_cache, compile_cache):
  from saltjax.app import run as run_lib
  import contextlib
  import io

  # 2048 x 2048 inputs, 24 a chip: tens of GiB of activations on a 16 GiB chip.
  config = tiny_config(
      data_cache, compile_cache, compile_for="v5e-1", fold=0, image_size=2048, batch_size=24
  )
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert run_lib.main(config, str(tmp_path / "run")) == 1
  line = err.getvalue().strip().splitlines()[-1]
  assert line.startswith("error: the train step (bce_dice), 1 fold(s)"), line
  assert "does not fit on one chip" in line or "of HBM of a v5e-1 chip" in line, line


def _epoch_flops_per_training_image(config) -> float:
  """The FLOPs of one epoch's programs (calls x per call) per training image.

  Compiled for this CPU: how the loops are scaled does not depend on the
  target, and XLA's CPU compiler takes a fraction of the TPU one's time.
  """
  from saltjax.app import compile_programs
  from saltjax.data import dataset as data_lib

  devices = jax.devices()[:1]
  programs, facts = compile_programs.job_programs(
      config, devices, data_lib.load(config), kinds=("train", "epoch_end")
  )
  assert facts["steps_per_epoch"] == 3  # a loop worth scaling
  flops = sum(p.flops_per_chip * p.calls_per_epoch for p in programs)
  return flops / (facts["steps_per_epoch"] * facts["images_per_chip_per_step"])


def test_every_iteration_of_a_programs_loops_is_counted(data_cache, compile_cache):
  # XLA's cost analysis counts a loop's body once. The same epoch of the same
  # two folds (3 steps of 8 images a fold, then validation) costs the same
  # FLOPs per training image however its programs loop: one fold at a time
  # with tf.data (a program a step, then the epoch's end), and the device
  # epoch with the folds in turn (one program: a scan over the steps, each
  # taking the gradients in a loop over the folds, then the validation's
  # loop over batches and folds). Counted once, the device epoch's training
  # would come out at a sixth.
  per_image = {}
  for name, overrides in {
      "one fold at a time": dict(parallel_folds=1),
      "device epoch, in turn": dict(fold_strategy="in_turn", input_pipeline="device"),
  }.items():
    config = tiny_config(data_cache, compile_cache, use_tfds=False, **overrides)
    per_image[name] = _epoch_flops_per_training_image(config)
  # The on-device batches (augmentation, resizing) add a little.
  assert per_image["device epoch, in turn"] == pytest.approx(
      per_image["one fold at a time"], rel=0.05
  ), per_image


def test_the_optimizer_sharding_splits_the_moments_over_the_slices_chips(
    compiled, data_cache, compile_cache
):
  # config.state_sharding='optimizer': each chip of a v5e-16 holds a
  # sixteenth of every optimiser moment that 16 divides; the weights stay
  # whole. The arguments per chip shrink by about the moments' 15/16 against
  # the fixture's replicated state (the default).
  from saltjax.app import compile_programs
  from saltjax.data import dataset as data_lib

  devices = tpu_slices.compile_only_devices(tpu_slices.slice_spec("v5e-16"))
  config = tiny_config(data_cache, compile_cache, **MULTI_HOST)
  config.state_sharding = "optimizer"
  data = data_lib.load(config)
  programs, _ = compile_programs.job_programs(config, devices, data, kinds=("train",))
  arguments = {
      "replicated": compiled["multi_host"]["programs"][0]["memory_per_chip"]["argument"],
      "optimizer": programs[0].memory_per_chip["argument"],
  }
  job = compile_programs.compile_job(config, devices, np.arange(48) % 2)
  params = sum(x.size for x in jax.tree.leaves(job.initial_variables["params"]))
  split = [s.spec for s in jax.tree.leaves(job.state_sharding.opt_state) if "data" in tuple(s.spec)]
  assert split and all(s[0] is None for s in split)  # never the fold axis
  # Adam's two moments, float32: 8 bytes a weight, 15/16 of it gone, less
  # what no axis of which 16 divides keeps whole (the chip pads small arrays
  # to its tiles, so the bytes saved may exceed the moments' own); the
  # weights themselves (4 bytes each) stay on every chip.
  saved = arguments["replicated"] - arguments["optimizer"]
  assert saved > 0.3 * 8 * params * 15 / 16, (saved, params)
  assert arguments["optimizer"] > 4 * params
