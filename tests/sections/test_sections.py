"""Whole-section segmentation: SEG-Y / .npy / PNG in, salt probability and masks out.

A tiny model is trained once (module fixture) on the embedded synthetic tiles,
then asked to find the salt body of synthetic sections several tiles wide,
whose true masks the generator knows.  The pieces that need no model are
tested beside this file (test_tiling.py, test_gray_mapping.py,
test_resampling.py, test_truth_masks.py, test_options.py, test_segy.py).
"""

import json
import pathlib

import cv2
import numpy as np
import pytest
import segyio

from saltjax.sections import gray_mapping
from saltjax.sections import predictor
from saltjax.sections import segy
from saltjax.sections import tiling
from saltjax.data import synthetic
from tests.conftest import run_main, tiny_config

ROWS, COLS = 250, 400  # samples x traces of the test section: 4 x 7 tiles at stride 50
# The tiny model's training: enough for the salt body to be found clearly.
# Fold 0 of 4 trains on 96 synthetic tiles, 12 steps an epoch (about 50 s of CPU time).
TRAIN = {
    "synthetic.num_train": 128,
    "num_folds": 4,
    "fold": 0,
    "num_epochs": 8,
    "schedule.cycle_epochs": 8,
    "batch_size": 8,
    "model.encoder_width": 8,
    "predict.tta": "none",
    "predict.batch_size": 32,
}


def _run(config, workdir):
  from saltjax.app import run

  return run.main(config, str(workdir))


def _segment_config(compile_cache, path, **segment):
  from configs import segment as segment_config

  config = segment_config.get_config()
  config.compilation_cache = compile_cache
  config.progress = False
  config.predict.tta = "none"
  config.predict.batch_size = 32
  config.segment.input = str(path)
  for key, value in segment.items():
    config.segment[key] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache, compile_cache):
  """A workdir with one trained fold and the tuned post-processing (scores.json)."""
  workdir = tmp_path_factory.mktemp("sections") / "run"
  config = tiny_config(data_cache, compile_cache, **TRAIN)
  assert _run(config, workdir) == 0
  from configs import predict as predict_config

  config = predict_config.get_config()
  config.compilation_cache = compile_cache
  config.progress = False
  config.predict.tta = "none"
  config.predict.batch_size = 32
  assert _run(config, workdir) == 0
  return workdir


def _iou(a, b):
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return (a & b).sum() / max((a | b).sum(), 1)


def _segy_line(path, seed):
  amplitude, mask = synthetic.generate_section(seed, ROWS, COLS)
  # Arbitrary units, as in real data: the clipping rule makes them irrelevant.
  segy.write_section(path, 350.0 * amplitude)
  return amplitude, mask


# ------------------------------------------------------ synthetic sections ---


def test_generate_section_draws_a_known_dome_with_the_tile_renderer():
  amplitude, mask = synthetic.generate_section(5, 220, 310)
  again, mask_again = synthetic.generate_section(5, 220, 310)
  np.testing.assert_array_equal(amplitude, again)
  np.testing.assert_array_equal(mask, mask_again)
  assert amplitude.shape == mask.shape == (220, 310) and amplitude.dtype == np.float32
  assert set(np.unique(mask)) == {0, 1} and np.isfinite(amplitude).all()
  # A diapir rising from the base: salt below a top-of-salt surface, so every
  # column is sediment above some depth and salt below it, and the body
  # reaches the base but not the top.
  assert (np.diff(mask.astype(int), axis=0) >= 0).all()
  assert mask[-1].any() and not mask[0].any()
  # Salt's inside is weak and chaotic: its amplitudes spread less than the
  # layered sediments' (the texture the tiles taught the model).
  inside = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
  outside = cv2.dilate(mask, np.ones((7, 7), np.uint8)) == 0
  assert amplitude[inside].std() < 0.7 * amplitude[outside].std()
  assert not np.array_equal(synthetic.generate_section(6, 220, 310)[1], mask)
  # The clipping rule puts the section in the gray range the model learned
  # from: its spread lies inside the middle 90% of the training tiles' spreads.
  gray = gray_mapping.amplitude_to_gray(amplitude, gray_mapping.clip_level(amplitude, 99))
  tile_spreads = [
      synthetic.generate_example(np.random.default_rng([0, 0, i]))[0].std() for i in range(100)
  ]
  low, high = np.percentile(tile_spreads, [5, 95])
  assert low < gray.std() < high, (low, gray.std(), high)
  assert abs(gray.mean() - 127.5) < 10


# --------------------------------------------------- with a trained model ---


def test_segy_line_is_segmented_and_its_headers_round_trip(trained, tmp_path, compile_cache):
  path = tmp_path / "line_a.sgy"
  _, truth = _segy_line(path, seed=11)
  assert _run(_segment_config(compile_cache, path), trained) == 0
  out = trained / "sections"
  names = {p.name for p in out.iterdir()}
  assert {
      "line_a_probability.npy",
      "line_a_mask.npy",
      "line_a_probability.png",
      "line_a_mask.png",
      "line_a_overlay.png",
      "line_a_probability.sgy",
      "line_a_segment.json",
  } <= names
  assert not [n for n in names if ".tmp" in n]
  prob = np.load(out / "line_a_probability.npy")
  mask = np.load(out / "line_a_mask.npy")
  summary = json.loads((out / "line_a_segment.json").read_text())
  scores = json.loads((trained / "scores.json").read_text())
  assert prob.shape == mask.shape == (ROWS, COLS)
  assert summary["threshold"] == scores["threshold"]
  assert summary["min_area"] == scores["min_area"]

  # The mask finds the known salt body: far better than chance, i.e. than
  # calling everything salt (IoU = the salt fraction) or a random mask of the
  # right size (IoU about fraction / (2 - fraction)).
  iou = _iou(mask, truth)
  fraction = truth.mean()
  assert 0.15 < fraction < 0.4
  assert iou > max(0.6, fraction + 0.3), (iou, fraction)

  # PNGs: the section's size; the mask PNG is the mask, the probability PNG its 8-bit image.
  for what in ("probability", "mask", "overlay"):
    image = cv2.imread(str(out / f"line_a_{what}.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == (ROWS, COLS)
  np.testing.assert_array_equal(
      cv2.imread(str(out / "line_a_mask.png"), cv2.IMREAD_UNCHANGED) > 0, mask > 0
  )

  # The SEG-Y copy: same text, binary and trace headers; samples are the probability.
  with segyio.open(str(path), ignore_geometry=True) as src, segyio.open(
      str(out / "line_a_probability.sgy"), ignore_geometry=True
  ) as dst:
    assert dst.tracecount == src.tracecount == COLS
    np.testing.assert_array_equal(dst.samples, src.samples)
    assert dst.text[0] == src.text[0]
    assert dict(dst.bin) == dict(src.bin)
    for i in range(src.tracecount):
      assert dict(dst.header[i]) == dict(src.header[i])
    np.testing.assert_allclose(dst.trace.raw[:], prob.T, atol=1e-7)


def test_default_rule_gives_the_same_mask_at_any_scale_and_scores_it(
    trained, tmp_path, compile_cache
):
  """Sections whose amplitudes differ from the training tiles' in scale and in contrast."""
  amplitude, truth = synthetic.generate_section(11, ROWS, COLS)
  np.save(tmp_path / "truth.npy", truth)
  cv2.imwrite(str(tmp_path / "truth.png"), truth * 255)
  # A reflector 30x the sediments' peak over 2% of the samples: it alone sets
  # the 99th percentile of |a|.
  strong = amplitude.copy()
  band = slice(40, 45)
  strong[band] = 30 * np.abs(amplitude).max() * np.sign(amplitude[band] + 1e-9)
  renderings = {
      "x0.01": 0.01 * amplitude,
      "x1": amplitude,
      "x1000": 1000.0 * amplitude,
      "strong": strong,
  }
  masks, summaries = {}, {}
  for name, values in renderings.items():
    path = tmp_path / f"scaled_{name.replace('.', '_')}.npy"
    np.save(path, values.astype(np.float32))
    truth_file = tmp_path / ("truth.png" if name == "strong" else "truth.npy")
    assert _run(_segment_config(compile_cache, path, truth=str(truth_file)), trained) == 0
    masks[name] = np.load(trained / "sections" / f"{path.stem}_mask.npy").astype(bool)
    summaries[name] = json.loads((trained / "sections" / f"{path.stem}_segment.json").read_text())

  reference = masks["x1"]
  for name in ("x0.01", "x1000"):
    assert (masks[name] != reference).mean() < 0.005, name
    assert summaries[name]["amplitude_rule"] == "match_training"
    scale = float(name[1:])
    assert summaries[name]["clip_level"] / scale == pytest.approx(
        summaries["x1"]["clip_level"], rel=1e-3
    )
  away = np.ones(reference.shape, bool)
  away[30:55] = False  # the reflector and the tiles' blur of it
  assert (masks["strong"][away] != reference[away]).mean() < 0.03
  # The body the generator drew is found.
  for name, mask in masks.items():
    assert _iou(mask, truth) >= 0.7, (name, _iou(mask, truth))

  # The scores in the summary are those of the mask against the truth file.
  for name, summary in summaries.items():
    mask = masks[name]
    tp, fp, fn = (
        (mask & (truth > 0)).sum(),
        (mask & (truth == 0)).sum(),
        (~mask & (truth > 0)).sum(),
    )
    for scores in (summary["truth"]["per_line"]["line"], summary["truth"]["overall"]):
      assert scores["iou"] == pytest.approx(_iou(mask, truth))
      assert scores["precision"] == pytest.approx(tp / (tp + fp))
      assert scores["recall"] == pytest.approx(tp / (tp + fn))
      assert scores["tiles"] == 3 * 4  # 101-pixel tiles at 0, 101, 149 (rows) x 0, 101, 202, 299
      assert 0 <= scores["competition_score"] <= 1

  # The old default, the 99th percentile of |a|, is set by the reflector: the
  # sediments come out flat gray and the mask is far worse.
  path = tmp_path / "scaled_strong.npy"
  assert _run(_segment_config(compile_cache, path, amplitude="percentile"), trained) == 0
  summary = json.loads((trained / "sections" / "scaled_strong_segment.json").read_text())
  assert summary["amplitude_rule"] == "percentile"
  assert summary["clip_level"] > 10 * summaries["strong"]["clip_level"]
  assert _iou(np.load(trained / "sections" / "scaled_strong_mask.npy"), truth) < 0.5


def test_older_workdir_gets_gray_levels_from_its_training_data_or_falls_back(
    trained, tmp_path, compile_cache, caplog
):
  import shutil

  workdir = tmp_path / "old"
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("sections", ".lock"))
  recorded = json.loads((workdir / "gray_levels.json").read_text())
  # A workdir of an earlier version recorded no vertical period: measured again.
  older = {k: v for k, v in recorded.items() if k != "vertical_period"}
  (workdir / "gray_levels.json").write_text(json.dumps(older))
  amplitude, _ = synthetic.generate_section(12, 150, 200)
  np.save(tmp_path / "old.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "old.npy"), workdir) == 0
  summary = json.loads((workdir / "sections" / "old_segment.json").read_text())
  assert summary["amplitude_rule"] == "match_training"
  assert "computed from the training images" in summary["amplitude"]["training_gray_levels"]
  again = json.loads((workdir / "gray_levels.json").read_text())
  assert again["deviation"] == recorded["deviation"]
  assert again["vertical_period"] == recorded["vertical_period"]
  assert summary["scale"]["vertical_period"]["training_gray_levels"].startswith("computed from")

  # Training data that cannot be read: the percentile rule, with a warning.
  (workdir / "gray_levels.json").unlink()
  empty = tmp_path / "no_tiles"
  empty.mkdir()
  config = json.loads((workdir / "config.json").read_text())
  config["data_dir"] = str(empty)
  (workdir / "config.json").write_text(json.dumps(config))
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert _run(_segment_config(compile_cache, tmp_path / "old.npy"), workdir) == 0
  summary = json.loads((workdir / "sections" / "old_segment.json").read_text())
  assert summary["amplitude_rule"] == "percentile"
  assert "gray_levels.json is missing" in summary["amplitude"]["fallback"]
  assert summary["clip_level"] == pytest.approx(gray_mapping.clip_level(amplitude, 99), rel=1e-6)
  assert any("99th percentile" in r.getMessage() for r in caplog.records)
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 1.0
  assert "gray_levels.json is missing" in summary["scale"]["fallback"]
  assert any("scale_samples=-1" in r.getMessage() for r in caplog.records)


def _jumps(prob, axis):
  """Mean |difference| between neighbouring columns (axis 1) or rows (axis 0)."""
  return np.abs(np.diff(prob, axis=axis)).mean(axis=1 - axis)


def _seam_ratio(prob, starts_rows, starts_cols):
  """How much larger the jumps across tile borders are than the jumps elsewhere.

  Entry k of _jumps(.., axis) is the step between pixels k and k+1; a tile
  starting at s (or ending at s + 100) puts a border between s-1 and s (or
  s+100 and s+101).  The ratio is the largest border step over the 95th
  percentile of the other steps, per axis.
  """
  ratios = []
  for axis, starts, length in ((0, starts_rows, prob.shape[0]), (1, starts_cols, prob.shape[1])):
    jumps = _jumps(prob, axis)
    borders = {s - 1 for s in starts if s > 0} | {s + 100 for s in starts if s + 101 < length}
    border = np.array(sorted(borders))
    others = np.delete(jumps, border)
    ratios.append(jumps[border].max() / np.percentile(others, 95))
  return max(ratios)


def test_blended_tiles_leave_no_seams_where_plain_tiling_does(trained, tmp_path, compile_cache):
  from saltjax.inference import trained_config

  amplitude, _ = synthetic.generate_section(12, ROWS, COLS)
  config = trained_config.config_for_prediction(
      _segment_config(compile_cache, tmp_path / "unused"), trained
  )
  config.segment = _segment_config(compile_cache, tmp_path / "unused").segment
  ensemble = predictor.load_ensemble(config, trained)
  gray = gray_mapping.amplitude_to_gray(amplitude, gray_mapping.clip_level(amplitude, 99))

  (blended,) = tiling.segment_sections([gray], ensemble.predict_tiles, stride=50)
  ratio = _seam_ratio(blended, tiling.tile_starts(ROWS, 50), tiling.tile_starts(COLS, 50))
  assert ratio < 1.5, ratio

  # Side by side, non-overlapping tiles (the last one flush with the edge),
  # averaged without a window: each tile's edge shows.
  (plain,) = tiling.segment_sections(
      [gray], ensemble.predict_tiles, stride=101, window=np.ones((101, 101))
  )
  plain_ratio = _seam_ratio(plain, tiling.tile_starts(ROWS, 101), tiling.tile_starts(COLS, 101))
  assert plain_ratio > 2.0, plain_ratio


def test_volume_gives_one_mask_per_inline_and_crosslines_on_request(
    trained, tmp_path, compile_cache
):
  truths, lines = [], []
  for seed in (21, 22, 23):
    amplitude, mask = synthetic.generate_section(seed, ROWS, COLS)
    lines.append(amplitude)
    truths.append(mask)
  path = segy.write_section(tmp_path / "cube.sgy", np.stack(lines), inlines=[100, 101, 102])
  np.save(tmp_path / "cube_truth.npy", np.stack([truths[0], truths[2]]))
  config = _segment_config(
      compile_cache, path, inlines="100,102", truth=str(tmp_path / "cube_truth.npy")
  )
  assert _run(config, trained) == 0
  out = trained / "sections"
  prob = np.load(out / "cube_probability.npy")
  mask = np.load(out / "cube_mask.npy")
  assert prob.shape == mask.shape == (2, ROWS, COLS)
  for k, inline in enumerate((100, 102)):
    for what in ("probability", "mask", "overlay"):
      assert (out / f"cube_inline{inline}_{what}.png").is_file()
    assert _iou(mask[k], truths[inline - 100]) > 0.5
  assert not (out / "cube_inline101_mask.png").exists()
  scored = json.loads((out / "cube_segment.json").read_text())["truth"]
  assert scored["per_line"]["inline 102"]["iou"] == pytest.approx(_iou(mask[1], truths[2]))
  assert scored["overall"]["iou"] == pytest.approx(_iou(mask, np.stack([truths[0], truths[2]])))
  assert scored["overall"]["tiles"] == 2 * scored["per_line"]["inline 100"]["tiles"]
  # A truth that is not one mask per segmented line is refused, naming the option.
  wrong = _segment_config(
      compile_cache, path, inlines="100", truth=str(tmp_path / "cube_truth.npy")
  )
  assert _run(wrong, trained) == 1
  # The SEG-Y copy holds the two inlines' traces with their own headers.
  with segyio.open(str(path), ignore_geometry=True) as src, segyio.open(
      str(out / "cube_probability.sgy"), ignore_geometry=True
  ) as dst:
    assert dst.tracecount == 2 * COLS
    kept = [
        i for i in range(src.tracecount) if src.header[i][segyio.TraceField.INLINE_3D] in (100, 102)
    ]
    for j, i in enumerate(kept):
      assert dict(dst.header[j]) == dict(src.header[i])
    np.testing.assert_allclose(dst.trace.raw[COLS:], prob[1].T, atol=1e-7)

  # Every inline by default: three masks, one per line, in inline order.
  assert _run(_segment_config(compile_cache, path), trained) == 0
  assert np.load(out / "cube_mask.npy").shape == (3, ROWS, COLS)
  # A crossline of a three-inline volume is 3 traces wide: smaller than a tile.
  bad = _segment_config(compile_cache, path, crosslines="5")
  assert _run(bad, trained) == 1


def test_npy_and_png_inputs_of_any_size(trained, tmp_path, compile_cache):
  amplitude, truth = synthetic.generate_section(31, 180, 333)
  np.save(tmp_path / "arr.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "arr.npy"), trained) == 0
  mask = np.load(trained / "sections" / "arr_mask.npy")
  assert mask.shape == (180, 333) and _iou(mask, truth) > 0.5
  assert not (trained / "sections" / "arr_probability.sgy").exists()
  # A PNG is a picture of the amplitudes: drawn darker or lighter, flatter or
  # harsher than the training tiles, it gives the amplitudes' mask.
  clip = json.loads((trained / "sections" / "arr_segment.json").read_text())["clip_level"]
  for name, (mid, contrast) in {"dark": (70, 40.0), "light": (190, 60.0)}.items():
    picture = np.clip(np.rint(mid + contrast * amplitude / clip), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / f"{name}.png"), picture)
    assert _run(_segment_config(compile_cache, tmp_path / f"{name}.png"), trained) == 0
    got = np.load(trained / "sections" / f"{name}_mask.npy")
    assert (got != mask).mean() < 0.01, name
    summary = json.loads((trained / "sections" / f"{name}_segment.json").read_text())
    assert summary["amplitude_rule"] == "match_training" and summary["amplitude"]["zero"] == mid
  # A 16-bit PNG stretched from the lowest to the highest amplitude.
  lo, hi = amplitude.min(), amplitude.max()
  picture = np.rint((amplitude - lo) * (65535 / (hi - lo))).astype(np.uint16)
  cv2.imwrite(str(tmp_path / "deep.png"), picture)
  assert _run(_segment_config(compile_cache, tmp_path / "deep.png"), trained) == 0
  assert (np.load(trained / "sections" / "deep_mask.npy") != mask).mean() < 0.01
  # 'as_is' gives the model the PNG's gray levels unchanged: those of the
  # amplitudes' own mapping, resampled by the same factors, give their mask exactly.
  cv2.imwrite(str(tmp_path / "pic.png"), gray_mapping.amplitude_to_gray(amplitude, clip))
  scale = json.loads((trained / "sections" / "arr_segment.json").read_text())["scale"]
  config = _segment_config(
      compile_cache,
      tmp_path / "pic.png",
      amplitude="as_is",
      scale_samples=scale["samples"],
      scale_traces=scale["traces"],
  )
  assert _run(config, trained) == 0
  np.testing.assert_array_equal(np.load(trained / "sections" / "pic_mask.npy"), mask)


# -------------------------------------------------------------- bad input ---


def _bad_inputs(tmp_path):
  """(path, text the error must contain) for each kind of bad input."""
  cases = []
  text = tmp_path / "notes.sgy"
  text.write_text("this is not seismic data\n" * 200)
  cases.append((text, "not a readable SEG-Y file"))
  good = segy.write_section(tmp_path / "whole.sgy", np.ones((150, 120), np.float32))
  data = good.read_bytes()
  truncated = tmp_path / "truncated.sgy"
  truncated.write_bytes(data[: len(data) - 301])  # cut inside the last trace
  cases.append((truncated, "not a readable SEG-Y file"))
  small = segy.write_section(tmp_path / "small.sgy", np.ones((80, 300), np.float32))
  cases.append((small, "at least 101 x 101"))
  with_nan = np.random.default_rng(0).standard_normal((150, 150)).astype(np.float32)
  with_nan[40, 70] = np.nan
  np.save(tmp_path / "nan.npy", with_nan)
  cases.append((tmp_path / "nan.npy", "NaN or infinite (the first at sample 40, trace 70)"))
  with_inf = np.random.default_rng(1).standard_normal((150, 150)).astype(np.float32)
  with_inf[3, 4] = np.inf
  cases.append((segy.write_section(tmp_path / "inf.sgy", with_inf), "NaN or infinite"))
  garbage = tmp_path / "garbage.npy"
  garbage.write_bytes(b"\x93NUMPY garbage")
  cases.append((garbage, "not a readable .npy array"))
  return cases


def test_bad_input_is_refused_naming_the_file_and_writing_nothing(
    trained, tmp_path, compile_cache, capsys
):
  before = (
      sorted(p.name for p in (trained / "sections").iterdir())
      if (trained / "sections").exists()
      else []
  )
  for path, expected in _bad_inputs(tmp_path):
    capsys.readouterr()
    assert _run(_segment_config(compile_cache, path), trained) == 1, path
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and expected in err, err
    assert "Traceback" not in err
    now = (
        sorted(p.name for p in (trained / "sections").iterdir())
        if (trained / "sections").exists()
        else []
    )
    assert now == before, path


def test_scale_segments_a_finer_section_at_the_models_sampling(
    trained, tmp_path, compile_cache, capsys
):
  """A section sampled twice as finely in depth and along the line (its layers,
  salt edges and noise twice the size in pixels) is resampled to the tiles'
  sampling, segmented there, and its outputs brought back to its own size:
  by default with factors estimated from its vertical period, or by the
  factors given."""
  amplitude, truth = synthetic.generate_section(11, ROWS, COLS)
  np.save(tmp_path / "coarse.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "coarse.npy"), trained) == 0
  coarse = np.load(trained / "sections" / "coarse_mask.npy")
  summary = json.loads((trained / "sections" / "coarse_segment.json").read_text())
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 1.0  # the tiles' sampling
  fine_size = (2 * COLS, 2 * ROWS)
  np.save(tmp_path / "fine.npy", cv2.resize(amplitude, fine_size, interpolation=cv2.INTER_CUBIC))
  fine_truth = cv2.resize(truth, fine_size, interpolation=cv2.INTER_NEAREST)
  np.save(tmp_path / "fine_truth.npy", fine_truth)
  config = _segment_config(
      compile_cache, tmp_path / "fine.npy", truth=str(tmp_path / "fine_truth.npy")
  )
  assert _run(config, trained) == 0
  summary = json.loads((trained / "sections" / "fine_segment.json").read_text())
  scale = summary["scale"]
  # Twice the period, brought back inside the tiles' range: about halved.
  period = scale["vertical_period"]
  assert period["section"] == pytest.approx(2 * _summary_period(trained, "coarse"), rel=0.05)
  assert 0.45 <= scale["samples"] == scale["traces"] <= 0.8
  assert period["section"] * scale["samples"] == pytest.approx(
      period["training_percentiles_20_80"][1], rel=0.005
  )
  assert summary["truth"]["overall"]["iou"] >= 0.7
  config = _segment_config(
      compile_cache,
      tmp_path / "fine.npy",
      scale_samples=0.5,
      scale_traces=0.5,
      truth=str(tmp_path / "fine_truth.npy"),
  )
  assert _run(config, trained) == 0
  fine = np.load(trained / "sections" / "fine_mask.npy")
  assert fine.shape == (2 * ROWS, 2 * COLS)
  # The coarse section's mask, at the fine section's size, up to the outline.
  assert (fine != cv2.resize(coarse, fine_size, interpolation=cv2.INTER_NEAREST)).mean() < 0.02
  assert _iou(fine, fine_truth) >= 0.7
  summary = json.loads((trained / "sections" / "fine_segment.json").read_text())
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 0.5
  assert summary["scale"]["model_shape"] == [ROWS, COLS]
  assert summary["scale"]["rule"].startswith("given")
  assert summary["min_area_section_pixels"] == round(4 * summary["min_area"])
  # A section too small once resampled is refused, naming the factors.
  np.save(tmp_path / "small.npy", amplitude[:150, :150])
  config = _segment_config(
      compile_cache, tmp_path / "small.npy", scale_samples=0.5, scale_traces=1.0
  )
  assert _run(config, trained) == 1
  assert "75 x 150 once resampled by config.segment.scale_samples" in capsys.readouterr().err


def _summary_period(workdir, stem):
  """The section's vertical period that <stem>_segment.json records."""
  summary = json.loads((workdir / "sections" / f"{stem}_segment.json").read_text())
  return summary["scale"]["vertical_period"]["section"]


def test_empty_or_untrained_workdir_is_refused(trained, tmp_path, compile_cache, capsys):
  line = tmp_path / "line.sgy"
  segy.write_section(line, np.random.default_rng(0).standard_normal((150, 150)))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _run(_segment_config(compile_cache, line), empty) == 1
  err = capsys.readouterr().err
  assert str(empty / "config.json") in err
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text((trained / "config.json").read_text())
  assert _run(_segment_config(compile_cache, line), untrained) == 1
  err = capsys.readouterr().err
  assert str(untrained) in err and "no trained fold" in err
  for workdir in (empty, untrained):
    assert not (workdir / "sections").exists()


def test_main_py_segments_a_png_from_the_command_line(trained, tmp_path, compile_cache):
  amplitude, _ = synthetic.generate_section(41, 120, 150)
  cv2.imwrite(
      str(tmp_path / "cli.png"),
      gray_mapping.amplitude_to_gray(amplitude, gray_mapping.clip_level(amplitude, 99)),
  )
  result = run_main(
      [
          "--config=configs/segment.py",
          f"--workdir={trained}",
          f"--config.segment.input={tmp_path / 'cli.png'}",
          f"--config.compilation_cache={compile_cache}",
          "--config.progress=False",
          "--config.predict.tta=none",
          "--config.predict.batch_size=32",
          "--config.segment.stride=40",
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((trained / "sections" / "cli_segment.json").read_text())
  assert summary["stride"] == 40 and summary["shape"] == [120, 150]
  assert pathlib.Path(trained / "sections" / "cli_overlay.png").is_file()


def test_bad_segment_config_values_are_all_named(tmp_path, compile_cache, capsys):
  config = _segment_config(
      compile_cache,
      tmp_path / "missing.sgy",
      stride=0,
      clip_percentile=0.0,
      clip_value=2.0,
      inlines="3",
      crosslines="4",
      truth=str(tmp_path / "no_truth.npy"),
      scale_samples=0.0,
      scale_traces=20.0,
  )
  assert _run(config, tmp_path / "run") == 1
  err = capsys.readouterr().err
  for text in (
      "config.segment.input=",
      "no such file",
      "config.segment.stride=0",
      "config.segment.clip_percentile=0.0",
      "config.segment.crosslines='4'",
      "config.segment.clip_value=2.0: is used only with config.segment.amplitude='value'",
      "config.segment.truth=",
      "config.segment.scale_samples=0.0: must be a factor in (0, 8]",
      "config.segment.scale_traces=20.0: must be a factor in (0, 8]",
  ):
    assert text in err, err
  assert not (tmp_path / "run").exists()
