"""Decodes the PNGs of a data directory and checks each one.

Images must be 101x101 8-bit gray (3 equal channels are accepted and
collapsed); masks 101x101, 8- or 16-bit, holding only 0 and the maximum or 0
and 1.  Checks return the reasons a file is unusable, one line each, for the
caller to name the file: `saltjax.data.layout` collects them with every other
problem of the directory.
"""

from __future__ import annotations

import cv2
import numpy as np

from saltjax import geometry

IMAGE_SIZE = geometry.ORIGINAL_SIZE

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_png(path: str) -> tuple[np.ndarray | None, str | None]:
  """Decodes a file as-is (bit depth and channels kept); (array, error)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return None, f"cannot be read ({e.strerror or e})"
  return decode_bytes(data)


def decode_bytes(data: bytes) -> tuple[np.ndarray | None, str | None]:
  """Decodes PNG bytes as-is (bit depth and channels kept); (array, error)."""
  if not data:
    return None, "is empty (0 bytes)"
  # libpng rejects most truncations itself, but a file cut right after its
  # last pixel data could still decode on some builds; a PNG always ends in an
  # IEND chunk, so its absence is a sure sign of truncation.
  if data.startswith(_PNG_SIGNATURE) and data.rfind(b"IEND") == -1:
    return None, "is truncated (no IEND chunk)"
  try:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error as e:  # pragma: no cover - depends on the OpenCV build
    return None, f"cannot be decoded ({str(e).strip().splitlines()[-1]})"
  if array is None:
    return None, "is unreadable or truncated (not a decodable image)"
  return array, None


def _to_gray(array: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
  """Collapses equal channels to one; lists what is wrong with the shape."""
  issues = []
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[:, :, 0]
  if array.ndim == 3:
    channels = array.shape[2]
    if channels == 4:
      issues.append("has 4 channels (RGBA); expected gray or 3 equal channels")
    elif channels == 3:
      if not (
          np.array_equal(array[:, :, 0], array[:, :, 1])
          and np.array_equal(array[:, :, 0], array[:, :, 2])
      ):
        issues.append("has 3 channels that are not equal (a color image);" " expected gray")
    else:
      issues.append(f"has {channels} channels; expected gray")
  elif array.ndim != 2:
    issues.append(f"has unexpected array shape {array.shape}")
  if array.ndim >= 2 and array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
    height, width = array.shape[:2]
    issues.append(f"is {width}x{height} pixels; expected" f" {IMAGE_SIZE}x{IMAGE_SIZE}")
  if issues:
    return None, issues
  return (array[:, :, 0] if array.ndim == 3 else array), []


def _bits(array: np.ndarray) -> int:
  return array.dtype.itemsize * 8


def check_image(array: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
  """An 8-bit (101, 101) gray image, or the reasons it is not one."""
  gray, issues = _to_gray(array)
  if array.dtype != np.uint8:
    issues.append(f"is {_bits(array)}-bit ({array.dtype}); images must be 8-bit")
  if issues:
    return None, issues
  return np.ascontiguousarray(gray), []


def check_mask(array: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
  """A {0, 1} uint8 (101, 101) mask, or the reasons it is not one."""
  gray, issues = _to_gray(array)
  if array.dtype == np.uint8:
    allowed = ({0, 255}, {0, 1})
  elif array.dtype == np.uint16:
    allowed = ({0, 65535}, {0, 1})
  else:
    issues.append(f"is {array.dtype}; masks must be 8- or 16-bit")
    allowed = None
  if gray is not None and allowed is not None:
    values = set(np.unique(gray).tolist())
    # Only 0/max or 0/1 are unambiguous; anything else (antialiased edges,
    # a label image, a photo saved as a mask) would silently change the truth.
    if not any(values <= ok for ok in allowed):
      shown = sorted(values)
      text = ", ".join(map(str, shown[:8]))
      text += ", ..." if len(shown) > 8 else ""
      article = "an" if _bits(array) == 8 else "a"
      issues.append(
          f"has values {{{text}}}; {article} {_bits(array)}-bit mask must hold"
          f" only 0 and {max(allowed[0])} or 0 and 1"
      )
  if issues:
    return None, issues
  return (gray != 0).astype(np.uint8), []


def load_checked(path: str, kind: str) -> tuple[np.ndarray | None, list[str]]:
  array, error = _decode_png(path)
  if error:
    return None, [error]
  return (check_image if kind == "image" else check_mask)(array)
