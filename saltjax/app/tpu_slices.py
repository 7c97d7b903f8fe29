"""Cloud TPU slices by the names Cloud TPU gives them: topology, hosts, and each chip's peaks.

`slice_spec('v5e-8')` says what a `--config.compile_for=v5e-8` run compiles
for: the topology XLA's TPU compiler is given
(`jax.experimental.topologies.get_topology_desc`, as MaxText's
`accelerator_to_spec_map` and xpk's system characteristics spell them), the
chips and hosts of the slice, and one chip's HBM, peak bfloat16 FLOP/s and
HBM bandwidth for the roofline bound.

Names count what Cloud TPU counts: TensorCores for v4 and v5p (two per chip,
used as one "megacore" device: v4-8 is 4 chips), chips for v5e
(`v5litepod-N`, alias `v5e-N`) and v6e.
"""

from __future__ import annotations

import dataclasses
import re

from saltjax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation's chip, from Cloud TPU's system architecture pages.

  Sources (per chip): v4 https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2,
  1,200 GB/s, 275 TFLOP/s bf16); v5e https://cloud.google.com/tpu/docs/v5e
  (16 GiB, 819 GB/s, 197 TFLOP/s); v5p https://cloud.google.com/tpu/docs/v5p
  (95 GiB, 2,765 GB/s, 459 TFLOP/s); v6e https://cloud.google.com/tpu/docs/v6e
  (32 GiB, 1,640 GB/s, 918 TFLOP/s).
  """

  topology_prefix: str  # how get_topology_desc names it: 'v4', 'v5e', 'v5' (v5p), 'v6e'
  chip_config: str  # 'megacore' (two TensorCores as one device) or 'default'
  cores_per_chip_in_name: int  # what the slice name counts: 2 for v4/v5p, 1 for chips
  hbm_bytes: int
  peak_flops: float  # bfloat16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  three_d: bool  # a 3-D torus (v4, v5p) or a 2-D one (v5e, v6e)
  max_chips_one_host: int  # the largest slice served by one host (VM)


GENERATIONS = {
    "v4": Generation("v4", "megacore", 2, 32 * GiB, 275e12, 1200e9, True, 4),
    "v5e": Generation("v5e", "default", 1, 16 * GiB, 197e12, 819e9, False, 8),
    "v5p": Generation("v5", "megacore", 2, 95 * GiB, 459e12, 2765e9, True, 4),
    "v6e": Generation("v6e", "default", 1, 32 * GiB, 918e12, 1640e9, False, 8),
}
_ALIASES = {"v5litepod": "v5e"}

# The slice shapes Cloud TPU offers, by chip count.
_SHAPES_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """A slice to compile for: what get_topology_desc needs, and the chip's peaks."""

  accelerator: str  # as given, e.g. 'v5litepod-16'
  generation: str  # 'v4', 'v5e', 'v5p', 'v6e'
  topology: str  # e.g. 'v5e:4x4'
  chip_config: str
  chips_per_host_bounds: tuple[int, int, int]
  chips: int
  hosts: int
  hbm_bytes_per_chip: int
  peak_flops_per_chip: float
  hbm_bandwidth_per_chip: float


def slice_spec(accelerator: str) -> SliceSpec:
  """The slice that a Cloud TPU accelerator name (v4-8, v5litepod-16, v5e-16, v5p-8, v6e-8) is."""
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", accelerator.strip().lower())
  if match is None:
    raise ConfigError(
        f"config.compile_for={accelerator!r}: not a Cloud TPU accelerator name; use e.g."
        f" v4-8, v4-32, v5litepod-16 (or v5e-16), v5p-8, v6e-8"
    )
  name = _ALIASES.get(match.group(1), match.group(1))
  gen = GENERATIONS[name]
  count = int(match.group(2))
  chips, rest = divmod(count, gen.cores_per_chip_in_name)
  shapes = _SHAPES_3D if gen.three_d else _SHAPES_2D
  if rest or chips not in shapes:
    sizes = ", ".join(f"{name}-{c * gen.cores_per_chip_in_name}" for c in sorted(shapes))
    raise ConfigError(f"config.compile_for={accelerator!r}: no such {name} slice; one of {sizes}")
  shape = shapes[chips]
  if chips <= gen.max_chips_one_host:
    bounds = tuple(shape) + (1,) * (3 - len(shape))
  else:
    bounds = (2, 2, 1)  # four chips a host on every multi-host slice
  hosts = chips // (bounds[0] * bounds[1] * bounds[2])
  return SliceSpec(
      accelerator=accelerator,
      generation=name,
      topology=f"{gen.topology_prefix}:{'x'.join(map(str, shape))}",
      chip_config=gen.chip_config,
      chips_per_host_bounds=bounds,
      chips=chips,
      hosts=hosts,
      hbm_bytes_per_chip=gen.hbm_bytes,
      peak_flops_per_chip=gen.peak_flops,
      hbm_bandwidth_per_chip=gen.hbm_bandwidth,
  )


def compile_only_devices(spec: SliceSpec) -> list:
  """The slice's devices (every host's chips), for compiling only: no TPU is needed.

  libtpu holds a lock file against a second process using the TPU; a
  compile-only client never touches one, so several such processes (tests on
  two workers) may load it at once.
  """
  import os

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a Cloud TPU VM, JAX's TPU set-up would ask the metadata server for
  # these and print a warning for each; what it is told here only quiets it
  # (the topology below is what the compiler gets).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  try:
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=spec.topology,
        chip_config_name=spec.chip_config,
        chips_per_host_bounds=spec.chips_per_host_bounds,
        num_slices=1,
    )
  except (ImportError, RuntimeError, ValueError) as e:
    raise ConfigError(
        f"config.compile_for={spec.accelerator!r}: XLA's TPU compiler is not available"
        f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install it with"
        " `pip install -r requirements-tpu.txt`"
    ) from e
  devices = list(topology.devices)
  if len(devices) != spec.chips:
    raise ConfigError(
        f"config.compile_for={spec.accelerator!r}: the topology {spec.topology} has"
        f" {len(devices)} devices, expected {spec.chips}"
    )
  return devices
