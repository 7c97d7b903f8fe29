"""The `config.augment` string: op names, their arguments and checks.

``"hflip|shift(8)|brightness(0.1)"`` names ops joined by ``|``, each with
optional positional arguments. This module only reads and checks the string;
it imports no TensorFlow, so the config checks and the on-device pipeline can
use it on a machine without TensorFlow. The ops themselves live
in two registries that implement exactly the names below: `saltjax.input_pipeline.tfdata_augment`
(TensorFlow, for the tf.data pipeline) and `saltjax.input_pipeline.on_device` (JAX, on
the accelerator).
"""

from __future__ import annotations

import ast
import dataclasses
import numbers
import re
from typing import Callable

from saltjax import geometry

ORIGINAL_SIZE = geometry.ORIGINAL_SIZE


def registrar(registry: dict) -> Callable:
  """A decorator that files an op factory under a name in `registry`.

  Each implementation of the ops (TensorFlow, JAX) keeps its own table of
  exactly the names `OPS` lists.
  """

  def register(name: str):
    def wrap(factory):
      registry[name] = factory
      return factory

    return wrap

  return register


def _probability(x) -> str | None:
  return None if 0 <= x <= 1 else "must be in [0, 1]"


def _pixels(x) -> str | None:
  # A reflect pad of the 101-pixel image can add at most 100 pixels a side.
  if not isinstance(x, numbers.Integral):
    return "must be a whole number of pixels"
  return None if 0 <= x < ORIGINAL_SIZE else f"must be in [0, {ORIGINAL_SIZE - 1}]"


def _max_scale(x) -> str | None:
  return None if 0 <= x <= 1 else "must be in [0, 1] (a zoom of up to 2x)"


def _non_negative(x) -> str | None:
  return None if x >= 0 else "must be >= 0"


def _contrast_delta(x) -> str | None:
  # The contrast factor is drawn from [1 - delta, 1 + delta): a factor below
  # 0 would invert the image, an empty range is no augmentation.
  return None if 0 < x <= 1 else "must be in (0, 1]"


@dataclasses.dataclass(frozen=True)
class Param:
  name: str
  default: float
  check: Callable[[float], str | None]


# Every op, with its parameters in positional order.
OPS: dict[str, tuple[Param, ...]] = {
    "hflip": (Param("p", 0.5, _probability),),
    "vflip": (Param("p", 0.5, _probability),),
    "shift": (Param("pixels", 8, _pixels),),
    "scale": (Param("max_scale", 0.1, _max_scale),),
    "brightness": (Param("delta", 0.1, _non_negative),),
    "contrast": (Param("delta", 0.1, _contrast_delta),),
}


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One parsed op: its name and every argument (defaults filled in)."""

  name: str
  args: tuple


_OP_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def parse(spec: str) -> list[OpSpec]:
  """``"op|op(arg)|..."`` -> [OpSpec]; ValueError naming the bad op or argument."""
  ops = []
  for part in filter(None, (p.strip() for p in (spec or "").split("|"))):
    m = _OP_RE.match(part)
    if not m or m.group(1) not in OPS:
      raise ValueError(
          f"unknown augmentation {part!r} in config.augment={spec!r}; known:"
          f" {', '.join(sorted(OPS))}"
      )
    name, params = m.group(1), OPS[m.group(1)]
    try:
      args = ast.literal_eval(f"({m.group(2)},)") if m.group(2) else ()
    except (ValueError, SyntaxError):
      args = None
    usage = f"{name}({', '.join(p.name for p in params)})"
    if (
        args is None
        or len(args) > len(params)
        or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in args)
    ):
      raise ValueError(
          f"bad arguments in augmentation {part!r} of config.augment={spec!r}:"
          f" use {usage} with numbers"
      )
    args = tuple(args) + tuple(p.default for p in params[len(args) :])
    for param, value in zip(params, args):
      problem = param.check(value)
      if problem:
        raise ValueError(
            f"augmentation {part!r} in config.augment={spec!r}: {param.name}={value!r}"
            f" {problem}"
        )
    ops.append(OpSpec(name, args))
  return ops
