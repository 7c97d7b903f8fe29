"""Where a compiled program's memory traffic goes: bytes by kind of operation and by phase.

Read from the optimized HLO text of a compiled program (`compiled.as_text()`):
every instruction the program runs (the entry computation's, and those of the
computations it calls) reads its operands and writes its result, each a
whole array in HBM (a fusion's intermediate values stay on chip). Summing
those sizes gives the program's traffic, split

- by kind: convolutions (and fusions around one), reductions, elementwise
  fusions (BatchNorm, activations, scSE gates, the optimiser's update), copies
  and layout changes (copy, transpose, slices), collectives, the rest;
- by phase, from the JAX op names XLA keeps: the forward pass, the backward
  pass, what is neither (the optimiser update, the finiteness check of the
  gradients, the loss), and what has no JAX op name (copies XLA inserted:
  layout changes, prefetches of weights into on-chip memory).

A loop body's instructions count as often as the body runs: its trip count
(`trip_count`, read from the program) times its enclosing loops'. XLA's cost
analysis counts a body once, whatever its trip count (a `lax.scan` of 50
steps costs what one does); `flops_as_run` scales XLA's FLOPs the same way.

The TPU compiler also annotates each instruction it emits with its estimate
of the cycles the instruction takes (`estimated_cycles` in its backend
config, from the compiler's cost model of the chip); their sum is the
program's estimated time if nothing overlapped.

Sizes are as laid out: the minor dimensions padded to the layout's tiles
(8 x 128 and the like), as the hardware moves them. Two exceptions read or
write part of an array: a dynamic slice or a gather reads only the slice (the
rows) of its operand that it returns, and a dynamic update of a slice
(alone, or at the root of a fusion, as XLA emits a loop that stacks its
results: each fold's gradients written into the (F, ...) buffer) writes that
slice in place, the rest of the buffer untouched.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"(?:calls|body|to_apply|branch_computations|true_computation|"
                     r"false_computation)=(\{[^}]*\}|%[\w.\-]+)")  # fmt: skip
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "iota", "opt-barrier",
}  # fmt: skip
_COPIES = {
    "copy", "transpose", "copy-start", "copy-done", "slice", "slice-start", "dynamic-slice",
    "dynamic-update-slice", "concatenate", "pad", "reshape", "broadcast",
}  # fmt: skip
_CONTROL = {"while", "call", "conditional"}
# Custom calls that move no data: a buffer set aside for a later in-place
# write; slices already side by side in memory taken as one array (the TPU
# compiler's concatenation of the parts of an array it copied in pieces).
_MOVES_NOTHING = re.compile(r'custom_call_target="(AllocateBuffer|ConcatBitcast)"')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_BODY = re.compile(r"body=%([\w.\-]+)")  # a while loop's body and condition
_CONDITION = re.compile(r"condition=%([\w.\-]+)")

KINDS = ("convolution", "reduction", "elementwise", "copies", "collectives", "other")
PHASES = ("forward", "backward", "other", "unnamed")


def array_bytes(shape: str, on_chip: bool = False) -> int:
  """The bytes of the arrays in an HLO shape string (a tuple's elements summed).

  Those in HBM, or with `on_chip` those whose layout names memory space 1
  (`S(1)`: the TPU's on-chip VMEM, where XLA keeps what fits between ops).
  """
  total = 0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if ("S(1)" in layout) != on_chip:
      continue
    total += _tiled_size(dims, layout) * _DTYPE_BYTES[dtype]
  return total


def _tiled_size(dims: str, layout: str) -> int:
  """Elements of an array as laid out: its minor dimensions padded to the layout's tile.

  `{1,3,2,0:T(8,128)(2,1)}`: minor-to-major order 1,3,2,0, and tiles of 8 x
  128 over the two most minor dimensions (a channel count of 4 then takes
  128 lanes: small arrays move far more than their elements).
  """
  sizes = [int(d) for d in dims.split(",") if d]
  order = re.match(r"\{([\d,]*)", layout or "")
  tile = re.search(r":T\(([\d,]+)\)", layout or "")
  if order and tile and sizes:
    minor_to_major = [int(d) for d in order.group(1).split(",") if d]
    for dim, t in zip(minor_to_major, reversed([int(t) for t in tile.group(1).split(",")])):
      sizes[dim] = -(-sizes[dim] // t) * t
  return math.prod(sizes) if sizes else 1


def _elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape `(a, (b), c)`."""
  elements, depth, start = [], 0, 1
  for i, c in enumerate(shape):
    depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(c, 0)
    if (c == "," and depth == 1) or (c == ")" and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return elements


def _async_copy_arrays(opcode: str, shape: str, source: str) -> list[str]:
  """What an asynchronous copy or slice moves: its destination, written, and as
  much read from the source's memory (its result tuple also names the source
  and a context, which it does not move)."""
  parts = _elements(shape)
  destination = parts[0] if opcode == "copy-start" else parts[1]
  space = re.search(r"S\(\d+\)", source)
  read = re.sub(r"S\(\d+\)", "", destination)
  if space:  # the source's memory space, in the destination's layout
    read = read[:-1] + space.group(0) + "}" if read.endswith("}") else read
  return [destination, read]


def _split_shape(rest: str) -> tuple[str, str]:
  """(the result shape, what follows it) of an instruction's right-hand side."""
  if rest.startswith("("):
    depth = 0
    for i, c in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(c, 0)
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].strip()
  shape, _, after = rest.partition(" ")
  return shape, after.strip()


def _parse(text: str) -> tuple[dict, str]:
  """({computation: [(name, shape, opcode, operands, attributes)]}, the entry's name).

  A computation's root comes last in its list; a parameter's operands are its
  number (`["0"]` for `parameter(0)`), a constant's its literal (`["50"]`).
  """
  computations, entry, current, root = {}, "", None, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0].split("(")[0]:
      if current is not None and root:
        current.append(root)
      current, root = computations.setdefault(head.group(2), []), None
      entry = head.group(2) if head.group(1) else entry
      continue
    match = _INSTRUCTION.match(line)
    if match is None or current is None:
      continue
    shape, after = _split_shape(match.group(3))
    opcode, _, args = after.partition("(")
    depth, end = 1, 0
    for end, c in enumerate(args):
      depth += {"(": 1, ")": -1}.get(c, 0)
      if depth == 0:
        break
    opcode = opcode.strip()
    operands = (
        [args[:end].strip()]
        if opcode in ("parameter", "constant")
        else re.findall(r"%([\w.\-]+)", args[:end])
    )
    instruction = (match.group(2), shape, opcode, operands, args[end + 1 :])
    if match.group(1):
      root = instruction
    else:
      current.append(instruction)
  if current is not None and root:
    current.append(root)
  return computations, entry


def _element_count(shape: str) -> int:
  """The elements of the first array in an HLO shape string."""
  found = _ARRAY.search(shape)
  return math.prod(int(d) for d in found.group(2).split(",") if d) if found else 0


def _fraction(part: str, whole: str) -> float:
  return _element_count(part) / max(_element_count(whole), 1)


def _accessed(opcode, shape, operands, attributes, shapes, computations) -> list[tuple[str, float]]:
  """(array, the fraction of it moved) for what an instruction reads and writes."""
  if opcode in ("copy-start", "slice-start"):
    return [(a, 1.0) for a in _async_copy_arrays(opcode, shape, shapes.get(operands[0], ""))]
  arrays = [(shape, 1.0)] + [(shapes.get(o, ""), 1.0) for o in operands]
  if opcode in ("dynamic-slice", "gather"):  # reads the slice (the rows) it returns
    return [arrays[0], (arrays[1][0], _fraction(shape, arrays[1][0])), *arrays[2:]]
  if opcode == "dynamic-update-slice":  # writes the update in place
    update = arrays[2][0]
    return [(shape, _fraction(update, shape)), *arrays[2:]]
  if opcode != "fusion":
    return arrays
  fused = computations.get(_fused_name(attributes), [])
  params = {name: int(ops[0]) for name, _, op, ops, _ in fused if op == "parameter" and ops}
  shapes_in = {name: shp for name, shp, _, _, _ in fused}
  if fused and fused[-1][2] == "dynamic-update-slice" and fused[-1][3][0] in params:
    root_operands = fused[-1][3]
    buffer = params[root_operands[0]]
    arrays[0] = (shape, _fraction(shapes_in.get(root_operands[1], ""), shape))
    arrays[1 + buffer] = (arrays[1 + buffer][0], 0.0)  # updated in place, not read
  for name, number in params.items():
    slices = _slices_of(fused, name)
    if slices:  # read only where it is sliced
      whole = arrays[1 + number][0]
      arrays[1 + number] = (whole, sum(_fraction(part, whole) for part in slices))
  return arrays


def _slices_of(fused: list, name: str) -> list[str]:
  """The shapes of the dynamic slices and gathers a fused computation takes of
  `name`, or none where anything else uses it."""
  slices = []
  for _, shape, op, ops, _ in fused:
    if name in ops:
      if op not in ("dynamic-slice", "gather") or name in ops[1:]:
        return []
      slices.append(shape)
  return slices


def _kind(opcode: str, attributes: str, computations: dict) -> str:
  if opcode == "convolution":
    return "convolution"
  if opcode.startswith(("all-", "reduce-scatter", "collective-permute", "all-to-all")):
    return "collectives"
  if opcode in ("reduce", "reduce-window"):
    return "reduction"
  if opcode in _COPIES:
    return "copies"
  if opcode == "fusion":
    opcodes = _fused_opcodes(attributes, computations, set())
    if "convolution" in opcodes:
      return "convolution"
    if opcodes & {"reduce", "reduce-window"}:
      return "reduction"
    if opcodes and opcodes <= (_COPIES | _FREE):
      return "copies"
    return "elementwise"
  return "other"


def _fused_name(attributes: str) -> str:
  """The name of the computation a fusion calls ('' where none is named)."""
  called = _CALLED.search(attributes)
  return called.group(1).strip("{}% ") if called else ""


def _fused_opcodes(attributes: str, computations: dict, seen: set) -> set:
  """The opcodes of a fusion's computation, and of the fusions nested in it."""
  name = _fused_name(attributes)
  if not name or name in seen:
    return set()
  seen.add(name)
  opcodes = set()
  for _, _, op, _, attrs in computations.get(name, []):
    opcodes.add(op)
    if op == "fusion":
      opcodes |= _fused_opcodes(attrs, computations, seen)
  return opcodes


def _phase(attributes: str) -> str:
  name = re.search(r'op_name="([^"]*)"', attributes)
  if name is None:  # what XLA added: layout copies, prefetches into VMEM
    return "unnamed"
  name = name.group(1)
  if "transpose(jvp(" in name:
    return "backward"
  if "jvp(" in name:
    return "forward"
  return "other"


def traffic(hlo_text: str) -> dict:
  """A compiled program's HBM traffic and estimated cycles, every loop body as often as it runs.

  {'hbm_bytes', 'on_chip_bytes', 'by_kind', 'by_phase', 'estimated_cycles',
  'loops'}: by_kind and by_phase split hbm_bytes; on_chip_bytes is what the
  same instructions read and write in VMEM instead; estimated_cycles sums the
  compiler's estimates (0 where it gives none, as XLA's CPU compiler); loops
  lists every while loop (`Loop`), whose body's instructions count `runs`
  times (once where its trip count could not be read).
  """
  computations, entry = _parse(hlo_text)
  by_kind = dict.fromkeys(KINDS, 0)
  by_phase = dict.fromkeys(PHASES, 0)
  on_chip = 0
  cycles = 0
  loops = []

  def walk(name: str, seen: tuple, runs: int, loop: str) -> None:
    nonlocal on_chip, cycles
    instructions = computations.get(name, [])
    shapes = {n: shape for n, shape, _, _, _ in instructions}
    for instruction in instructions:
      _, shape, opcode, operands, attributes = instruction
      estimate = _CYCLES.search(attributes)
      if estimate:
        cycles += runs * int(estimate.group(1))
      if opcode in _FREE:
        continue
      if opcode == "while":
        body = _BODY.search(attributes).group(1)
        trips = trip_count(instruction, instructions, computations)
        loops.append(Loop(body, loop, trips, runs * (1 if trips is None else trips)))
        if body not in seen:
          walk(body, seen + (body,), loops[-1].runs, body)
        continue
      if opcode in _CONTROL:
        for called in _CALLED.findall(attributes):
          for callee in called.strip("{}").replace("%", "").split(","):
            callee = callee.strip()
            if callee and callee not in seen:
              walk(callee, seen + (callee,), runs, loop)
        continue
      if opcode.endswith("-done"):  # an asynchronous op, counted where it starts
        continue
      if opcode == "custom-call" and _MOVES_NOTHING.search(attributes):
        continue
      arrays = _accessed(opcode, shape, operands, attributes, shapes, computations)
      moved = runs * sum(f * array_bytes(a) for a, f in arrays)
      by_kind[_kind(opcode, attributes, computations)] += moved
      by_phase[_phase(attributes)] += moved
      on_chip += runs * sum(f * array_bytes(a, on_chip=True) for a, f in arrays)

  walk(entry, (entry,), 1, entry)
  return {
      "hbm_bytes": sum(by_kind.values()),
      "on_chip_bytes": on_chip,
      "by_kind": by_kind,
      "by_phase": by_phase,
      "estimated_cycles": cycles,
      "loops": loops,
  }


@dataclasses.dataclass(frozen=True)
class Loop:
  """A while loop of a compiled program."""

  body: str  # its body's computation
  parent: str  # the body of the loop it is in (the entry computation's name if none)
  trips: int | None  # its trip count; None where it could not be read
  runs: int  # how often its body runs in one call of the program


_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def trip_count(instruction, instructions: list, computations: dict) -> int | None:
  """A while loop's trip count, or None where the program does not say it.

  XLA's CPU compiler writes it in the loop's backend config. The TPU
  compiler does not: there it is read from the loop itself, as
  `lax.scan`/`lax.map`/`fori_loop` lower it: a counter (a tuple element)
  that starts at a constant, grows by a constant each iteration (the body's
  result) and is compared with a constant bound (`counter < bound`, the
  condition's result).
  """
  _, _, _, operands, attributes = instruction
  known = _KNOWN_TRIPS.search(attributes)
  if known:
    return int(known.group(1))
  condition = _CONDITION.search(attributes)
  body = _BODY.search(attributes)
  if not (condition and body and operands):
    return None
  in_condition = {i[0]: i for i in computations.get(condition.group(1), [])}
  compare = computations.get(condition.group(1), [None])[-1]
  if compare is None or compare[2] != "compare" or "direction=LT" not in compare[4]:
    return None
  index = _counter_index(_source(compare[3][0], in_condition))
  bound = _constant(_source(compare[3][1], in_condition))
  here = {i[0]: i for i in instructions}
  init = _source(operands[0], here)
  in_body = {i[0]: i for i in computations.get(body.group(1), [])}
  result = computations.get(body.group(1), [None])[-1]
  if (
      index is None
      or bound is None
      or not (init and init[2] == "tuple" and index < len(init[3]))
      or not (result and result[2] == "tuple" and index < len(result[3]))
  ):
    return None
  start = _constant(_source(init[3][index], here))
  add = _source(result[3][index], in_body)
  if start is None or add is None or add[2] != "add" or len(add[3]) != 2:
    return None
  terms = [_source(o, in_body) for o in add[3]]
  steps = [_constant(t) for t in terms if _counter_index(t) != index]
  if len(steps) != 1 or steps[0] is None or steps[0] <= 0:
    return None
  return max(0, -(-(bound - start) // steps[0]))


def _source(name: str, instructions: dict):
  """The instruction `name`, looked through copies and bitcasts."""
  instruction = instructions.get(name)
  while instruction and instruction[2] in ("copy", "bitcast") and instruction[3]:
    instruction = instructions.get(instruction[3][0])
  return instruction


def _constant(instruction) -> int | None:
  if instruction and instruction[2] == "constant":
    literal = re.fullmatch(r"-?\d+", instruction[3][0].strip()) if instruction[3] else None
    return int(literal.group(0)) if literal else None
  return None


def _counter_index(instruction) -> int | None:
  """The tuple index of the loop parameter's element that `instruction` reads."""
  if instruction and instruction[2] == "get-tuple-element":
    index = re.search(r"index=(\d+)", instruction[4])
    return int(index.group(1)) if index else None
  return None


def flops_as_run(hlo_text: str, loops: list[Loop], counted: float) -> float:
  """XLA's FLOPs of a compiled program with every loop body counted as often as it runs.

  counted: XLA's cost analysis of the program (`compiled.cost_analysis()`),
  which counts each loop body once. Each body's own FLOPs (without the loops
  inside it) are XLA's cost analysis of the body alone (the same module,
  the body its entry; the analysis is that of the backend the program ran
  on, run with this process's CPU client: FLOPs do not depend on the
  layouts), added runs - 1 more times.
  """
  if all(loop.runs == 1 for loop in loops):
    return counted
  flops = {loop.body: _computation_flops(hlo_text, loop.body) for loop in loops}
  total = counted
  for loop in loops:
    inner = sum(flops[other.body] for other in loops if other.parent == loop.body)
    total += (loop.runs - 1) * (flops[loop.body] - inner)
  return total


def _computation_flops(hlo_text: str, computation: str) -> float:
  """XLA's cost analysis of one computation of a module (its loops' bodies once)."""
  import jax
  from jax._src.lib import _jax
  from jax._src.lib import hlo

  lines = []
  for line in hlo_text.splitlines():
    if line.startswith("HloModule "):  # its aliasing and layouts name the old entry's
      line = "HloModule " + computation
    elif line.startswith("ENTRY "):
      line = line[len("ENTRY ") :]
    if line.startswith(f"%{computation} "):
      line = "ENTRY " + line
    lines.append(line)
  module = hlo.hlo_module_from_text("\n".join(lines))
  # As jax's own Lowered.cost_analysis calls it.
  return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"])
