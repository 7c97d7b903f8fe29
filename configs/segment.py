"""Segment whole seismic sections with what a workdir holds.

python main.py --config=configs/segment.py --workdir=runs/fold \
    --config.segment.input=line.sgy

The model comes from the workdir's own config.json; the `predict` section of
this config chooses the checkpoints and the TTA, and `segment` the input, the
tiling and the amplitude mapping. Outputs go to <workdir>/sections/.
"""

import ml_collections

from configs import fold


def get_config():
  config = fold.get_config()
  config.mode = "segment"
  config.segment = ml_collections.ConfigDict(
      dict(
          input="",  # a SEG-Y file (2-D line or 3-D volume), a .npy array or a PNG
          inlines="",  # 3-D: inline numbers to segment, e.g. '100,102,110-120' ('' = every inline)
          crosslines="",  # 3-D: crossline numbers instead of inlines (not both)
          stride=50,  # pixels between tile origins; 101-pixel tiles overlap by 101 - stride
          # Resample the section by these factors before tiling (0.5: half as many
          # samples, 1: as it is), so that its features have the size the model
          # learned them at; the outputs are at the section's own size.
          # scale_samples=-1: estimated from the section's vertical period against
          # the training tiles' (left at 1 when it is within their range);
          # scale_traces=-1: the factor scale_samples comes to.
          scale_samples=-1.0,
          scale_traces=-1.0,
          # Amplitude -> gray: 127.5 + 127.5 * clip(a / c, -1, 1), with the clip level c
          # chosen by this rule: 'match_training' fits c so that the section's gray
          # levels match the training images' (<workdir>/gray_levels.json);
          # 'percentile' takes c = clip_percentile-th percentile of |a| over every
          # selected line; 'value' takes c = clip_value.  An unsigned input (8- or
          # 16-bit PNG, uint8 or uint16 array) is a picture of amplitudes a = value -
          # (its median value), mapped by the same rules; 'as_is' gives an 8-bit
          # input to the model unchanged.
          amplitude="match_training",
          clip_percentile=99.0,
          clip_value=0.0,
          truth="",  # a known salt mask (.npy, .npz or PNG): adds IoU and scores to the summary
          threshold=-1.0,  # -1: the threshold tuned on the OOF predictions (scores.json)
          min_area=-1,  # -1: the tuned minimum area; salt regions smaller are removed
      )
  )
  return config
