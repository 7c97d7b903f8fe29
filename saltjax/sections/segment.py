"""Segmenting whole seismic sections with a trained workdir's ensemble.

python main.py --config=configs/segment.py --workdir=runs/fold \\
    --config.segment.input=line.sgy

The competition's 101x101 tiles were cut from seismic sections; this module
runs the workdir's model on sections of any size, the way an interpreter
would use it:

1. Read the input (`inputs`): a SEG-Y 2-D line or 3-D volume (every inline, or the
   inlines or crosslines asked for), a .npy array, or a PNG.  Sections are
   (samples, traces): depth down the rows, traces along the columns.
2. Map amplitudes to the model's 8-bit range (`gray_mapping`): gray =
   127.5 + 127.5 * clip(a / c, -1, 1), rounded.  The clip level c is chosen
   by `segment.amplitude`: 'match_training' (the default) fits c so that the
   section's gray levels match those of the tiles the model was trained on
   (<workdir>/gray_levels.json, `gray_mapping.match_training_clip`); 'percentile' takes
   the `clip_percentile`-th percentile of |a|; 'value' takes `clip_value`.
   One c serves every selected line.  Unsigned inputs (8- and 16-bit PNGs,
   uint8 and uint16 arrays), and any input that is never negative, are
   pictures of amplitudes drawn around some middle level at some contrast,
   neither of which need be the training tiles': their amplitude is a =
   value - (their median value), mapped by the same rules; 'as_is' gives an
   8-bit picture to the model unchanged.
3. Resample the gray section by `scale_samples` x `scale_traces`, so that its
   features are the size the model learned them at (`resampling.choose_scale`): by
   default (-1) the factor down the traces is estimated from the section's
   vertical period against the training tiles' (a section sampled twice as
   finely has twice the period), and the factor along the line follows it;
   cut overlapping 101x101 tiles (`stride` apart; the last tile of a row or
   column is aligned with the section's edge), predict every tile with the
   fold x snapshot ensemble and TTA (as `configs/predict.py` does), and
   blend the tile probabilities with a smooth window that falls to almost 0
   at a tile's border, so no seam shows (`tiling`); resample the blended
   probability back to the section's own size.
4. Binarise the blended probability at the threshold tuned on the
   out-of-fold predictions (scores.json) and remove salt regions smaller
   than the tuned minimum area (on a tile that rule empties small masks; on
   a section it removes small connected regions; `predictor`).
5. With `segment.truth` (a known mask), score the mask against it: IoU,
   precision and recall of salt pixels, and the competition score over the
   section's 101x101 tiles, per line and overall (`truth_masks`).
6. Write the outputs under <workdir>/sections/, each file under a temporary
   name first and all renamed into place at the end: nothing is written
   when the input is bad (`outputs`).

This module runs those steps in order (`segment_input`); `run` is what main.py runs, once
`saltjax.app.run` has checked config.segment (`options.check_config`) and the config.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Iterator, Sequence

import numpy as np

from saltjax.sections import gray_mapping
from saltjax.sections import inputs
from saltjax.sections import options
from saltjax.sections import outputs
from saltjax.sections import predictor
from saltjax.sections import resampling
from saltjax.sections import tiling
from saltjax.sections import truth_masks

# Tiles predicted together; several small lines share one chunk.
_CHUNK_TILES = 2048


def map_to_model(
    source: inputs.SectionInput,
    scan: inputs.Scan,
    segment,
    stats: dict | None,
    stats_note: str = "",
) -> tuple[object, float, dict, dict]:
  """How `segment` gives a scanned input to the model: (config.segment with the
  scale factors chosen, clip level, amplitude report, scale report).

  Refuses a section that holds no tile once resampled (`resampling.check_size`).
  """
  factors, scale = resampling.choose_scale(scan, segment, stats, stats_note)
  segment = resampling.with_scale(segment, factors)
  resampling.check_size(source, scan.shape, segment)
  clip, amplitude = gray_mapping.choose_clip(source, scan, segment, stats, stats_note)
  return segment, clip, amplitude, scale


def segment_input(
    config, workdir: pathlib.Path, ensemble: predictor.Ensemble | None = None
) -> dict:
  """Segments config.segment.input with the workdir's ensemble; writes the outputs.

  Returns the summary also written as <stem>_segment.json.
  """
  s = config.segment
  started = time.time()
  source = inputs.open_input(
      s.input,
      options.parse_line_numbers(s.inlines, "inlines"),
      options.parse_line_numbers(s.crosslines, "crosslines"),
  )
  try:
    scan = inputs.scan_input(source)
    stats, note = (None, "")
    if s.amplitude == "match_training" or -1 in (s.scale_samples, s.scale_traces):
      stats, note = gray_mapping.training_gray_levels(config, workdir)
    s, clip, amplitude, scale = map_to_model(source, scan, s, stats, note)
    truth = truth_masks.read_truth(s.truth, source, scan.shape) if s.truth else None
    ensemble = ensemble or predictor.load_ensemble(config, workdir)
    return _segment_and_write(
        s, workdir, source, clip, amplitude, scale, scan.shape, ensemble, started, truth
    )
  finally:
    source.close()


def _segment_and_write(
    s,
    workdir,
    source: inputs.SectionInput,
    clip: float,
    amplitude: dict,
    scale: dict,
    shape: tuple[int, int],
    ensemble: predictor.Ensemble,
    started: float,
    truth: np.ndarray | None = None,
) -> dict:
  """Segments every line of `source` and writes the outputs; s: config.segment with
  the scale factors chosen."""
  names = outputs.output_names(source.path.stem)
  out_dir = workdir / outputs.SECTIONS_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  staged = outputs.StagedOutputs(out_dir)
  try:
    stacked = _stacked(source, shape)
    prob_out = np.lib.format.open_memmap(
        staged.temp_path(names["probability"]), mode="w+", dtype=np.float32, shape=stacked
    )
    mask_out = np.lib.format.open_memmap(
        staged.temp_path(names["mask"]), mode="w+", dtype=np.uint8, shape=stacked
    )
    salt_fraction, truth_counts = _segment_lines(
        s, source, amplitude, ensemble, truth, staged, prob_out, mask_out
    )
    prob_out.flush()
    mask_out.flush()
    written_segy = None
    if source.kind == "segy":
      written_segy = outputs.write_segy_copy(source, prob_out, staged.temp_path(names["segy"]))
    summary = _summary(s, source, shape, clip, amplitude, scale, ensemble, salt_fraction)
    summary["seconds"] = round(time.time() - started, 3)
    summary["outputs"] = sorted(p.name for _, p in staged.pending) + [names["summary"]]
    if written_segy:
      summary["segy_traces"] = written_segy
    if truth is not None:
      summary["truth"] = _truth_summary(s, source, truth_counts)
    staged.write_bytes(names["summary"], (json.dumps(summary, indent=1) + "\n").encode())
    del prob_out, mask_out
    staged.commit()
  except BaseException:
    staged.discard()
    raise
  return summary


def _stacked(source: inputs.SectionInput, shape: tuple[int, int]) -> tuple[int, ...]:
  """The outputs' array shape: (lines, samples, traces) of a volume, else (samples, traces)."""
  return (len(source.sections),) + shape if source.is_volume else shape


def _segment_lines(
    s,
    source: inputs.SectionInput,
    amplitude: dict,
    ensemble: predictor.Ensemble,
    truth: np.ndarray | None,
    staged: outputs.StagedOutputs,
    prob_out: np.ndarray,
    mask_out: np.ndarray,
) -> tuple[dict[str, float], dict[str, dict]]:
  """Every line's probability and mask, into prob_out and mask_out (its PNGs staged),
  a chunk of lines at a time.  Returns ({line: salt fraction}, {line: its counts
  against the truth}; empty without one)."""
  resampled = resampling.model_shape(prob_out.shape[-2:], s)
  tiles_per = [
      len(tiling.tile_starts(resampled[0], s.stride))
      * len(tiling.tile_starts(resampled[1], s.stride))
  ] * len(source.sections)
  window = tiling.tile_window()
  salt_fraction, truth_counts = {}, {}
  for chunk in _chunks(tiles_per):
    grays = []
    for i in chunk:
      values = source.sections[i].read()
      grays.append(gray_mapping.model_gray(values, amplitude))
    predicted = predictor.probabilities_and_masks(grays, ensemble, s, window)
    for i, gray, (prob, mask) in zip(chunk, grays, predicted):
      section = source.sections[i]
      target = (i,) if source.is_volume else ()
      prob_out[target] = prob
      mask_out[target] = mask
      outputs.write_line_pngs(staged, source.path.stem, section.label, gray, prob, mask)
      salt_fraction[section.name] = float(mask.mean())
      where = source.path.name + ("" if section.name == "line" else f" {section.name}")
      logging.info("%s: %.1f%% salt", where, 100 * salt_fraction[section.name])
      if truth is not None:
        truth_counts[section.name] = truth_masks.truth_counts(truth[i], mask)
        truth_masks.log_scores(where, truth_masks.scores_of([truth_counts[section.name]]))
  return salt_fraction, truth_counts


def _summary(
    s,
    source: inputs.SectionInput,
    shape: tuple[int, int],
    clip: float,
    amplitude: dict,
    scale: dict,
    ensemble: predictor.Ensemble,
    salt_fraction: dict[str, float],
) -> dict:
  """<stem>_segment.json: what was segmented and how (its time, files and scores added
  by the caller)."""
  return {
      "input": str(source.path),
      "kind": source.kind,
      "volume": source.is_volume,
      "direction": source.direction if source.is_volume else None,
      "sections": [sec.name for sec in source.sections],
      "shape": list(_stacked(source, shape)),
      "layout": ("(lines, samples, traces)" if source.is_volume else "(samples, traces)"),
      "amplitude_to_gray": amplitude["description"],
      "amplitude_rule": amplitude["rule"],
      "clip_level": clip,
      "amplitude": amplitude,
      "stride": s.stride,
      "scale": {
          "samples": s.scale_samples,
          "traces": s.scale_traces,
          "model_shape": list(resampling.model_shape(shape, s)),
          **scale,
      },
      "threshold": ensemble.threshold,
      "min_area": ensemble.min_area,
      "min_area_section_pixels": resampling.section_min_area(ensemble.min_area, s),
      "tta": ensemble.tta,
      "models": ensemble.models,
      "salt_fraction": salt_fraction,
  }


def _truth_summary(s, source: inputs.SectionInput, truth_counts: dict[str, dict]) -> dict:
  """<stem>_segment.json's "truth": the scores against config.segment.truth."""
  overall = truth_masks.scores_of(list(truth_counts.values()))
  if len(truth_counts) > 1:
    truth_masks.log_scores(f"{source.path.name} (all {len(truth_counts)} lines)", overall)
  return {
      "path": str(pathlib.Path(s.truth).expanduser()),
      "per_line": {name: truth_masks.scores_of([c]) for name, c in truth_counts.items()},
      "overall": overall,
      "definitions": (
          "iou, precision and recall of salt pixels (overall: of every line's pixels"
          " together); competition_score: the competition metric averaged over 101x101"
          " tiles side by side, the last of each row and column flush with the section's"
          " edge"
      ),
  }


def _chunks(tiles_per_section: Sequence[int]) -> Iterator[list[int]]:
  """Indices of sections predicted together: about _CHUNK_TILES tiles at a time."""
  chunk, count = [], 0
  for i, n in enumerate(tiles_per_section):
    if chunk and count + n > _CHUNK_TILES:
      yield chunk
      chunk, count = [], 0
    chunk.append(i)
    count += n
  if chunk:
    yield chunk


def run(trained, workdir) -> dict:
  """What `main.py --config=configs/segment.py` runs.

  trained: the workdir's training config with this run's `predict` and
  `segment` sections (`saltjax.inference.trained_config.config_for_prediction`),
  checked (`saltjax.app.run` checks both first).
  """
  workdir = pathlib.Path(workdir)
  summary = segment_input(trained, workdir)
  out_dir = workdir / outputs.SECTIONS_DIR
  print(
      f"segmented {len(summary['sections'])} section(s) of {summary['input']}"
      f" in {summary['seconds']:.1f} s; wrote {out_dir}/{pathlib.Path(summary['input']).stem}_*"
  )
  return summary
