"""A seeded, deterministic stand-in for the Kaggle TGS Salt data: masks and images.

The competition data cannot be downloaded here, so this module draws synthetic
examples (a 101x101 gray image, its salt mask and a depth) and whole seismic
sections; `saltjax.data.synthetic_dataset` writes the examples as a data set in
exactly the Kaggle layout.

Images imitate the real ones, which are crops of vertical-incidence seismic
sections: blocky layered reflectivity, gently folded, dipping and faulted,
convolved vertically with a Ricker wavelet, plus noise.  Salt bodies replace the
layers with a high-impedance body whose inside is weak and chaotic, whose
boundary reflects strongly, against which the layers drag up and beneath which
the image is dimmed.  Salt is therefore recognisable by texture and boundaries,
not by brightness.

Masks follow the statistics of the 4,000 real training labels: a coverage class
is drawn from the published class counts, then a smooth random field is
thresholded at exactly the number of pixels that gives a coverage in that class,
so that the class spread matches by construction and the body's shape (one side
of a curved interface, a dome, a sheet, a blob, a straight flank) comes from the
field.  As in the real labels, almost every body touches the image border and is
one connected component with a smooth boundary.
"""

from __future__ import annotations

import cv2
import numpy as np

from saltjax import geometry

# Bump whenever the output for a given seed changes, so that datasets cached by
# `synthetic_dataset.ensure_dataset` under an old name are not mistaken for the
# new generator's.
VERSION = 1

IMAGE_SIZE = geometry.ORIGINAL_SIZE
_NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

# Coverage class counts of the 4,000 competition training masks (class 0 is
# empty; class i covers (i-1)/10 < coverage <= i/10).
PUBLISHED_CLASS_COUNTS = (1562, 576, 296, 224, 186, 225, 205, 174, 148, 159, 245)
_CLASS_PROBS = np.array(PUBLISHED_CLASS_COUNTS, np.float64)
_CLASS_PROBS /= _CLASS_PROBS.sum()

# Depths in the real depths.csv run from 50 to 959.
_DEPTH_RANGE = (50, 960)

# Images are rendered on a canvas with this margin on every side and then
# cropped, so that filters and the wavelet see no image border.
_PAD = 16


def _class_area_bounds(cls: int) -> tuple[int, int]:
  """The smallest and largest pixel count whose coverage class is `cls`."""
  # class(area) = ceil(10 * area / N), so class c holds the areas with
  # (c - 1) * N < 10 * area <= c * N.
  return (cls - 1) * _NUM_PIXELS // 10 + 1, cls * _NUM_PIXELS // 10


def _sample_area(rng: np.random.Generator) -> int:
  """Draws a salt pixel count with the real labels' coverage statistics."""
  cls = int(rng.choice(11, p=_CLASS_PROBS))
  if cls == 0:
    return 0
  lo, hi = _class_area_bounds(cls)
  if cls == 1:
    # Within class 1 the real areas are close to uniform in sqrt(area) from 1
    # to 32 pixels on a side (median ~270 px, 10% under ~16 px, ~7% under 10).
    return min(hi, int(round((1.0 + 31.0 * rng.random()) ** 2)))
  if cls == 10:
    # Near-full masks crowd towards full (real median 97% coverage), but none
    # of the 4,000 real masks is 100% full, so keep at least one pixel free.
    hi = _NUM_PIXELS - 1
    return hi - int((hi - lo + 1) * rng.random() ** 2)
  return int(rng.integers(lo, hi + 1))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
) -> np.ndarray:
  """A smooth random field of about unit std with `cells` bumps per axis."""
  # Bicubic upsampling of a coarse grid of random values is a cheap smooth
  # random field; the extra border cells keep the edges as lively as the middle.
  coarse = rng.standard_normal((cells[0] + 2, cells[1] + 2)).astype(np.float32)
  fine = cv2.resize(
      coarse,
      (shape[1] + 2 * shape[1] // cells[1], shape[0] + 2 * shape[0] // cells[0]),
      interpolation=cv2.INTER_CUBIC,
  )
  oy, ox = (fine.shape[0] - shape[0]) // 2, (fine.shape[1] - shape[1]) // 2
  return fine[oy : oy + shape[0], ox : ox + shape[1]]


def _unit(angle: float) -> np.ndarray:
  return np.array([np.cos(angle), np.sin(angle)])


def _normal_angle(rng: np.random.Generator) -> float:
  """Direction (x right, y down) pointing from sediments into the salt."""
  # Real masks touch the bottom edge most often (top of salt seen from above),
  # then the sides and the top; any other direction cuts a corner.
  kind = rng.random()
  if kind < 0.36:
    base, spread = np.pi / 2, 0.7  # Salt below.
  elif kind < 0.5:
    base, spread = -np.pi / 2, 0.7  # Salt above (base of salt, overhang).
  elif kind < 0.85:
    base, spread = (0.0 if rng.random() < 0.5 else np.pi), 0.45  # A flank.
  else:
    base, spread = 0.0, np.pi  # Any direction: mostly corner pieces.
  return base + rng.uniform(-spread, spread)


def _mask_field(rng: np.random.Generator, area: int) -> np.ndarray:
  """A random field whose `area` highest pixels form a credible salt body."""
  coords = np.arange(IMAGE_SIZE, dtype=np.float32) / (IMAGE_SIZE - 1) - 0.5
  cy, cx = np.meshgrid(coords, coords, indexing="ij")
  shape = (IMAGE_SIZE, IMAGE_SIZE)

  def wobble(amp_lo, amp_hi):
    # Smooth undulation of the interface plus, sometimes, the small-scale
    # jaggedness of a hand-drawn label.
    cells = int(rng.integers(2, 6))
    field = rng.uniform(amp_lo, amp_hi) * _smooth_noise(rng, shape, (cells, cells))
    if rng.random() < 0.3:
      cells = int(rng.integers(12, 30))
      field += rng.uniform(0.003, 0.012) * _smooth_noise(rng, shape, (cells, cells))
    return field

  family = rng.random()
  if family < 0.08:
    # A straight, nearly vertical flank: common in the real labels.
    n = _unit((0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0, 0.03))
    # The tiny vertical term breaks ties between pixels of one column.
    return n[0] * cx + n[1] * cy + 1e-4 * (cy if rng.random() < 0.5 else -cy)
  if family < 0.16 and area >= 300:
    # A sheet or tongue: a band along a gently curved, mostly flat line that
    # may end inside the image.
    n = _unit(np.pi / 2 + rng.uniform(-0.45, 0.45))
    t = np.array([-n[1], n[0]])
    along = t[0] * cx + t[1] * cy
    line = (
        n[0] * cx
        + n[1] * cy
        - rng.uniform(-0.3, 0.3)
        + rng.uniform(-1.0, 1.0) * along**2
        + wobble(0.01, 0.05)
    )
    field = -np.abs(line)
    if rng.random() < 0.5:
      tip = rng.uniform(-0.2, 0.4)
      field -= 0.5 * np.maximum(0.0, along * rng.choice([-1, 1]) - tip)
    return field
  if family < 0.28:
    # A blob, usually centred near or beyond the border so that it enters
    # the image from an edge or a corner.
    center = rng.uniform(-0.5, 0.5, 2)
    if rng.random() < 0.95:
      axis = rng.integers(2)
      center[axis] = rng.choice([-1, 1]) * rng.uniform(0.45, 0.8)
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = cx - center[0], cy - center[1]
    u, v = (c * dx + s * dy) / rng.uniform(0.5, 1.5), -s * dx + c * dy
    return -np.sqrt(u * u + v * v) + wobble(0.01, 0.06)
  # One side of a curved interface: salt below a top of salt, above a base,
  # beside a flank; positive curvature makes a dome, negative a trough.
  n = _unit(_normal_angle(rng))
  t = np.array([-n[1], n[0]])
  along = t[0] * cx + t[1] * cy - rng.uniform(-0.4, 0.4)
  kind = rng.random()
  if kind < 0.3:
    curvature = rng.uniform(0.5, 4.0)
  elif kind < 0.5:
    curvature = -rng.uniform(0.3, 2.0)
  else:
    curvature = rng.uniform(-0.3, 0.3)
  return n[0] * cx + n[1] * cy - curvature * along**2 + wobble(0.01, 0.12)


def generate_mask(rng: np.random.Generator) -> np.ndarray:
  """Draws one salt mask, uint8 {0, 1} of shape (101, 101).

  `generate_example` starts by calling this with the same generator, so the
  masks of the examples follow exactly these statistics.
  """
  area = _sample_area(rng)
  mask = np.zeros(_NUM_PIXELS, np.uint8)
  if not area:
    return mask.reshape(IMAGE_SIZE, IMAGE_SIZE)
  # Some real masks have a second, smaller piece of salt (about 8% have more
  # than one connected component); the pieces share the drawn area.
  second = 0
  if area >= 50 and rng.random() < 0.1:
    second = int(area * rng.uniform(0.02, 0.3))
  field = _mask_field(rng, area - second).reshape(-1)
  # The highest pixels of the field: exactly the drawn coverage, whatever the
  # field looks like.
  mask[np.argpartition(-field, area - second - 1)[: area - second]] = 1
  if second:
    field = _mask_field(rng, second).reshape(-1)
    field[mask == 1] = -np.inf
    mask[np.argpartition(-field, second - 1)[:second]] = 1
  return mask.reshape(IMAGE_SIZE, IMAGE_SIZE)


def _ricker(frequency: float) -> np.ndarray:
  """A Ricker wavelet, `frequency` in cycles per pixel, as a column kernel."""
  half = int(np.ceil(1.5 / frequency))
  t = np.arange(-half, half + 1, dtype=np.float32)
  a = (np.pi * frequency * t) ** 2
  return ((1.0 - 2.0 * a) * np.exp(-a)).reshape(-1, 1).astype(np.float32)


def _layered_log_impedance(rng: np.random.Generator, length: int, width: int) -> np.ndarray:
  """Blocky layered log-impedance, indexed by [depth sample, x]."""
  # Layer thicknesses are exponential (a few pixels on average), and the
  # impedance of each layer is heavy-tailed so that a few interfaces make
  # bright continuous reflectors, as in real sections.
  mean_thickness = rng.uniform(1.5, 5.0)
  tops = np.cumsum(rng.exponential(mean_thickness, length + 1))
  layer = np.searchsorted(tops, np.arange(length))
  values = rng.laplace(0.0, 1.0, layer[-1] + 1).astype(np.float32)
  # A slow trend gives packages of brighter and dimmer layering.
  values *= (
      0.4 + np.abs(_smooth_noise(rng, (layer[-1] + 1, 1), (max(1, (layer[-1] + 1) // 8), 1)))[:, 0]
  )
  trace = values[layer] + 0.15 * rng.standard_normal(length).astype(np.float32)
  # Layers thin, thicken and fade laterally over long distances.
  lateral = 1.0 + rng.uniform(0.1, 0.5) * _smooth_noise(
      rng, (length, width), (max(2, length // 6), int(rng.integers(1, 4)))
  )
  return trace[:, None] * lateral


def _layer_depth(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, salt: np.ndarray | None
) -> np.ndarray:
  """Depth coordinate of the layering at each pixel of the padded canvas.

  Regional dip, folds that vary mostly along x, and fault throws; against a salt
  body (`salt`, the padded mask, or None without salt) the layers drag up.  A
  layer is a level set of it.
  """
  height, width = xx.shape
  depth = (
      yy
      + rng.normal(0.0, 0.15) * (xx - width / 2)
      + rng.uniform(0.0, 6.0)
      * _smooth_noise(rng, (height, width), (int(rng.integers(1, 3)), int(rng.integers(1, 4))))
  )
  for _ in range(rng.poisson(0.6)):
    # A steep fault through a random point; one side is thrown down.
    angle = rng.uniform(np.deg2rad(55), np.deg2rad(85)) * rng.choice([-1, 1])
    px, py = rng.uniform(0, (width, height))
    side = (xx - px) * np.sin(angle) - (yy - py) * np.cos(angle)
    depth += rng.uniform(2.0, 10.0) * rng.choice([-1, 1]) * np.clip(side + 0.5, 0.0, 1.0)
  if salt is not None:
    # Drag: layers bend up against the salt and thin over its top.
    dist = cv2.distanceTransform((1 - salt).astype(np.uint8), cv2.DIST_L2, 5)
    depth += rng.uniform(2.0, 12.0) * np.exp(-dist / rng.uniform(4.0, 20.0))
  return depth


def _sediment(
    rng: np.random.Generator, depth: np.ndarray, xx: np.ndarray, salt: np.ndarray | None
) -> np.ndarray:
  """The layered impedance at each pixel, of unit spread, dimmed beneath the salt."""
  top = int(np.floor(depth.min())) - 2
  length = int(np.ceil(depth.max())) - top + 3
  layered = _layered_log_impedance(rng, length, xx.shape[1])
  sediment = cv2.remap(layered, xx, depth - top, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
  sediment *= 1.0 / (sediment.std() + 1e-6)
  if salt is not None:
    # Beneath salt the image is poorly lit: dim the layers under the body.
    above = np.maximum.accumulate(salt, axis=0).astype(np.float32) - salt
    shadow = cv2.GaussianBlur(above, (0, 0), 3.0)
    sediment *= 1.0 - rng.uniform(0.2, 0.7) * shadow
  return sediment


def _vertical_derivative(field: np.ndarray) -> np.ndarray:
  out = np.zeros_like(field)
  out[1:-1] = 0.5 * (field[2:] - field[:-2])
  return out


def _reflectivity(
    rng: np.random.Generator, sediment: np.ndarray, salt: np.ndarray | None
) -> np.ndarray:
  """Vertical-incidence reflectivity of the sediments with the salt body, if any."""
  # Vertical-incidence reflectivity is the vertical derivative of impedance
  # (centred, so that a boundary's reflection straddles it instead of falling
  # on the salt side); steep salt flanks reflect little at vertical incidence,
  # but migration smears some of a dipping flank into the image.
  if salt is None:
    return _vertical_derivative(sediment)
  soft = cv2.GaussianBlur(salt.astype(np.float32), (0, 0), 0.8)
  # Salt is much faster and denser than the sediments (a strong boundary
  # reflector), with a weak, chaotic inside.
  contrast = rng.uniform(1.5, 3.5)
  chaos = cv2.GaussianBlur(
      rng.standard_normal(salt.shape).astype(np.float32), (0, 0), rng.uniform(0.7, 1.5)
  )
  chaos *= 1.0 / (chaos.std() + 1e-6) * rng.uniform(0.15, 0.5)
  impedance = (1.0 - soft) * sediment + soft * (contrast + chaos)
  reflectivity = _vertical_derivative(impedance)
  flank = np.zeros_like(impedance)
  flank[:, 1:-1] = 0.5 * np.abs(soft[:, 2:] - soft[:, :-2])
  reflectivity += rng.uniform(0.2, 0.6) * contrast * flank
  return reflectivity


def _render_amplitudes(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, float]:
  """Seismic amplitudes for a {0, 1} salt mask of any (rows, cols) shape.

  Returns the float32 section (depth down the rows) and the amplitude level
  that `_render_image` maps to its gray spread.  For a 101x101 mask the draws
  are exactly those the dataset has always been made with.
  """
  rows, cols = mask.shape
  height, width = rows + 2 * _PAD, cols + 2 * _PAD
  salt = None
  if mask.any():
    salt = cv2.copyMakeBorder(mask.astype(np.uint8), _PAD, _PAD, _PAD, _PAD, cv2.BORDER_REPLICATE)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  depth = _layer_depth(rng, xx, yy, salt)
  sediment = _sediment(rng, depth, xx, salt)
  reflectivity = _reflectivity(rng, sediment, salt)

  # Dominant frequency so that bands are a few pixels thick.
  wavelet = _ricker(rng.uniform(0.07, 0.16))
  lateral_blur = rng.uniform(0.4, 1.5)

  def image_of(reflectivity):
    trace = cv2.filter2D(reflectivity, -1, wavelet, borderType=cv2.BORDER_REFLECT)
    # Limited lateral resolution.
    trace = cv2.GaussianBlur(trace, (0, 0), sigmaX=lateral_blur, sigmaY=0.3)
    return trace[_PAD : _PAD + rows, _PAD : _PAD + cols]

  reflectivity += (
      rng.uniform(0.05, 0.8)
      * reflectivity.std()
      * rng.standard_normal((height, width)).astype(np.float32)
  )
  trace = image_of(reflectivity)
  trace += (
      rng.uniform(0.0, 0.15) * trace.std() * rng.standard_normal(trace.shape).astype(np.float32)
  )
  # Amplitudes are scaled between the level of the layers alone (so weak salt
  # stays weak when it fills the image) and the image's own level (the partial
  # automatic gain control of processed sections).
  scale = trace.std() + 1e-6
  if salt is not None:
    own = rng.uniform(0.0, 0.6)
    reference = image_of(_vertical_derivative(sediment)).std() + 1e-6
    scale = reference ** (1.0 - own) * scale**own
  return trace, float(scale)


def _render_image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
  """Renders a seismic-looking uint8 image for a {0, 1} salt mask."""
  trace, scale = _render_amplitudes(rng, mask)
  # Map amplitudes to gray around the real mean of ~120, with the wide spread
  # of contrast in the real images; a few are blurry and washed out.
  if rng.random() < 0.1:
    trace = cv2.GaussianBlur(trace, (0, 0), rng.uniform(1.0, 2.5))
    gray_std = rng.uniform(10.0, 25.0)
  else:
    gray_std = float(np.exp(rng.uniform(np.log(14.0), np.log(65.0))))
  gray = rng.normal(120.0, 10.0) + gray_std * trace / scale
  return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def generate_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
  """Draws one example.

  Returns:
    image: uint8 (101, 101) seismic-looking gray image.
    mask: uint8 (101, 101) in {0, 1}, 1 where salt.
    depth: int, the depth of the image in the range of the real depths.csv.
  """
  mask = generate_mask(rng)
  image = _render_image(rng, mask)
  depth = int(rng.integers(*_DEPTH_RANGE))
  return image, mask, depth


def section_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  """A salt diapir rising from the base of a (rows, cols) section, uint8 {0, 1}.

  The top of salt is a dome: a parabola whose crest lies in the upper half of
  the section and whose flanks reach the base, with a gently wobbling outline.
  """
  y = (np.arange(rows, dtype=np.float32)[:, None] + 0.5) / rows
  x = (np.arange(cols, dtype=np.float32)[None, :] + 0.5) / cols
  crest_x, crest_y = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.5)
  half_width = rng.uniform(0.25, 0.38)
  top = crest_y + (1.0 - crest_y) * ((x - crest_x) / half_width) ** 2
  top = top + 0.03 * _smooth_noise(rng, (1, cols), (1, int(rng.integers(2, 5))))
  return (y > top).astype(np.uint8)


def generate_section(seed: int, rows: int = 300, cols: int = 400) -> tuple[np.ndarray, np.ndarray]:
  """A seismic section larger than a tile, with a known salt body.

  The section is drawn by the same renderer as the 101x101 examples (layers,
  folds and faults, drag against the salt, the salt's chaotic inside and
  strong boundary, the shadow beneath it, Ricker wavelet, noise), at the same
  pixel scale, so a model trained on the tiles sees familiar texture.

  Returns:
    amplitude: float32 (rows, cols), depth down the rows and traces along the
      columns, in arbitrary units of about unit spread (map it to gray with
      `saltjax.sections.gray_mapping.amplitude_to_gray`, as for a real section).
    mask: uint8 (rows, cols) in {0, 1}, 1 where salt.
  """
  if rows < 1 or cols < 1:
    raise ValueError(f"a section needs rows, cols >= 1, got {rows}, {cols}")
  rng = np.random.default_rng([seed, 0x5EC7])
  mask = section_mask(rng, rows, cols)
  trace, scale = _render_amplitudes(rng, mask)
  return (trace / scale).astype(np.float32), mask
