"""saltjax.app.hlo_traffic on a hand-written TPU HLO module: bytes counted by hand.

Each instruction reads its operands and writes its result whole; arrays in
memory space 1 (VMEM, `S(1)`) are on chip, not HBM; minor dimensions are
padded to the layout's tile; a loop body counts as often as it runs, its
trip count read from the program (once where the program does not say it).
"""

import pytest


from saltjax.app import hlo_traffic

HLO = """HloModule jit_step, entry_computation_layout={(bf16[8,128]{1,0})->bf16[8,128]{1,0}}

%fused_add (param_0.1: bf16[8,128]) -> bf16[8,128] {
  %param_0.1 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %add.1 = bf16[8,128]{1,0:T(8,128)(2,1)} add(bf16[8,128]{1,0:T(8,128)(2,1)} %param_0.1, bf16[8,128]{1,0:T(8,128)(2,1)} %param_0.1), backend_config={"estimated_cycles":"999"}
}

%inner_conv (param_0.2: bf16[1,8,8,128], param_1.2: bf16[1,1,128,128]) -> bf16[1,8,8,128] {
  %param_0.2 = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.2 = bf16[1,1,128,128]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.1 = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)} convolution(%param_0.2, %param_1.2), window={size=1x1}, dim_labels=b01f_01io->b01f
}

%fused_conv (param_0.3: bf16[1,8,8,128], param_1.3: bf16[1,1,128,128]) -> bf16[1,8,8,128] {
  %param_0.3 = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.3 = bf16[1,1,128,128]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %fusion.9 = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)} fusion(%param_0.3, %param_1.3), kind=kOutput, calls=%inner_conv
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0:T(128)}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p), index=0
  %gte.1 = f32[4]{0:T(128)} get-tuple-element(%p), index=1
  %negate.1 = f32[4]{0:T(128)} negate(%gte.1), metadata={op_name="jit(step)/transpose(jvp(UNet))/neg"}, backend_config={"flag_configs":[],"estimated_cycles":"50"}
  ROOT %tuple.1 = (s32[], f32[4]{0:T(128)}) tuple(%gte.0, %negate.1)
}

%cond (p.1: (s32[], f32[4])) -> pred[] {
  %p.1 = (s32[], f32[4]{0:T(128)}) parameter(0)
  ROOT %constant.1 = pred[] constant(false)
}

ENTRY %main (x: bf16[8,128], img: bf16[1,8,8,128], w: bf16[1,1,128,128], v: f32[4]) -> bf16[8,128] {
  %x = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %img = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %w = bf16[1,1,128,128]{3,2,1,0:T(8,128)(2,1)} parameter(2)
  %v = f32[4]{0:T(128)} parameter(3)
  %fusion.1 = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(UNet)/add"}, backend_config={"estimated_cycles":"300","iteration_bounds":["1"]}
  %fusion.2 = bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)S(1)} fusion(%img, %w), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(step)/jvp(UNet)/conv"}, backend_config={"estimated_cycles":"1200"}
  %copy.1 = f32[4]{0:T(128)} copy(%v)
  %copy-start.1 = (bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%x)
  %copy-done.1 = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %slice-start.1 = ((bf16[1,8,8,128]{3,2,1,0:T(8,128)(2,1)}), bf16[1,4,8,128]{3,2,1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%img), slice={[0:1], [0:4], [0:8], [0:128]}
  %slice-done.1 = bf16[1,4,8,128]{3,2,1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start.1)
  %c = s32[] constant(0)
  %init = (s32[], f32[4]{0:T(128)}) tuple(%c, %copy.1)
  %while.1 = (s32[], f32[4]{0:T(128)}) while(%init), condition=%cond, body=%body
  ROOT %bitcast.1 = bf16[8,128]{1,0:T(8,128)(2,1)} bitcast(%fusion.1)
}
"""


def test_array_bytes_pad_the_minor_dimensions_to_the_tile():
  assert hlo_traffic.array_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 8 * 128 * 2
  # 4 lanes of a 128-lane tile: the array takes a whole tile row.
  assert hlo_traffic.array_bytes("f32[4]{0:T(128)}") == 128 * 4
  assert hlo_traffic.array_bytes("bf16[2,3,4]{2,1,0:T(8,128)}") == 2 * 8 * 128 * 2
  assert hlo_traffic.array_bytes("bf16[8,128]{1,0:T(8,128)S(1)}") == 0
  assert hlo_traffic.array_bytes("bf16[8,128]{1,0:T(8,128)S(1)}", on_chip=True) == 2048
  assert hlo_traffic.array_bytes("(f32[2], s32[3])") == 2 * 4 + 3 * 4


def test_a_programs_traffic_by_kind_and_phase_counted_by_hand():
  moved = hlo_traffic.traffic(HLO)
  add = 2048 + 2048  # fusion.1 reads x and writes its sum
  image, weights = 8 * 8 * 128 * 2, 128 * 128 * 2
  conv = image + weights  # reads both from HBM; its output stays in VMEM
  # f32[4] padded to 128 lanes, read and written; x read by the prefetch into
  # VMEM (an asynchronous copy: counted once, at its start).
  # And half of img sliced into VMEM: half of it read.
  half = 8 * 4 * 128 * 2
  copy = 512 + 512 + 2048 + half
  negate = 512 + 512  # in the loop body, once: its condition names no trip count
  assert moved["by_kind"] == {
      "convolution": conv,
      "reduction": 0,
      "elementwise": add,
      "copies": copy,
      "collectives": 0,
      "other": negate,
  }
  assert moved["by_phase"] == {
      "forward": add + conv,
      "backward": negate,
      "other": 0,
      "unnamed": copy,  # no JAX op name: what XLA added
  }
  assert moved["hbm_bytes"] == add + conv + copy + negate
  # The conv's result, the prefetched x, the slice.
  assert moved["on_chip_bytes"] == image + 2048 + half
  # The compiler's estimates of the instructions the program runs: the two
  # fusions and, once, the loop body's negate; not the fused add inside
  # fusion.1, which fusion.1's estimate covers.
  assert moved["estimated_cycles"] == 300 + 1200 + 50


# A loop that stacks each fold's result in an (F, ...) buffer and reads each
# fold's weights out of the stacked ones: XLA fuses the update into the
# buffer in place and the slice into its consumer.
STACKING = """HloModule jit_folds, entry_computation_layout={(f32[5,8,128]{2,1,0})->f32[5,8,128]{2,1,0}}

%stack_one (buffer: f32[5,8,128], i: s32[], g: bf16[1,8,128]) -> f32[5,8,128] {
  %buffer = f32[5,8,128]{2,1,0:T(8,128)} parameter(0)
  %i = s32[] parameter(1)
  %g = bf16[1,8,128]{2,1,0:T(8,128)(2,1)} parameter(2)
  %convert.1 = f32[1,8,128]{2,1,0:T(8,128)} convert(%g)
  %zero = s32[] constant(0)
  ROOT %dus.1 = f32[5,8,128]{2,1,0:T(8,128)} dynamic-update-slice(%buffer, %convert.1, %i, %zero, %zero)
}

%weights_of (stacked: f32[5,8,128], j: s32[]) -> bf16[1,8,128] {
  %stacked = f32[5,8,128]{2,1,0:T(8,128)} parameter(0)
  %j = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  %ds.1 = f32[1,8,128]{2,1,0:T(8,128)} dynamic-slice(%stacked, %j, %zero.1, %zero.1), dynamic_slice_sizes={1,8,128}
  ROOT %convert.2 = bf16[1,8,128]{2,1,0:T(8,128)(2,1)} convert(%ds.1)
}

ENTRY %main (w: f32[5,8,128], acc: f32[5,8,128], k: s32[]) -> f32[5,8,128] {
  %w = f32[5,8,128]{2,1,0:T(8,128)} parameter(0)
  %acc = f32[5,8,128]{2,1,0:T(8,128)} parameter(1)
  %k = s32[]{:T(128)} parameter(2)
  %fusion.3 = bf16[1,8,128]{2,1,0:T(8,128)(2,1)} fusion(%w, %k), kind=kLoop, calls=%weights_of
  %fusion.4 = f32[5,8,128]{2,1,0:T(8,128)} fusion(%acc, %k, %fusion.3), kind=kLoop, calls=%stack_one
  %zero.2 = s32[]{:T(128)} constant(0)
  %ds.2 = f32[1,8,128]{2,1,0:T(8,128)} dynamic-slice(%w, %k, %zero.2, %zero.2), dynamic_slice_sizes={1,8,128}
  %stack = f32[5,8,128]{2,1,0:T(8,128)} custom-call(), custom_call_target="AllocateBuffer"
  %joined = f32[2,8,128]{2,1,0:T(8,128)} custom-call(%ds.2, %ds.2), custom_call_target="ConcatBitcast"
  ROOT %dus.2 = f32[5,8,128]{2,1,0:T(8,128)} dynamic-update-slice(%fusion.4, %ds.2, %k, %zero.2, %zero.2)
}
"""


def test_a_dynamic_slice_reads_its_slice_and_an_update_writes_its_slice_in_place():
  moved = hlo_traffic.traffic(STACKING)
  one_f32, one_bf16, index = 8 * 128 * 4, 8 * 128 * 2, 4  # a fold's slice; an s32[] index
  weights_of = one_f32 + index + one_bf16  # w's slice read, its bf16 copy written
  stack_one = 0 + index + one_bf16 + one_f32  # acc not read; the update read, its slice written
  ds = one_f32 + 3 * index + one_f32  # w's slice read, then written
  dus = one_f32 + 3 * index + one_f32  # the update read, then written into the buffer
  # Not the whole (5, 8, 128) buffers (20 KiB each) that these name; a
  # buffer allocated to be written in place later moves nothing, nor do
  # slices side by side in memory taken as one array (ConcatBitcast).
  assert moved["hbm_bytes"] == weights_of + stack_one + ds + dus


# Two nested loops as XLA's TPU compiler emits them (no trip count in their
# backend configs): the outer counter starts at 0 and steps by 1 below 4, the
# inner one starts at 1 (copied) and steps by 2 below 7: 3 trips, each a dot
# of two 64 x 64 matrices; the entry computes one more.
LOOPS = """HloModule jit_loops

%inner_body (p.i: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p.i = (s32[], f32[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p.i), index=0
  %x.i = f32[64,64]{1,0} get-tuple-element(%p.i), index=1
  %dot.i = f32[64,64]{1,0} dot(%x.i, %x.i), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next.i = s32[] add(%i, %two)
  ROOT %t.i = (s32[], f32[64,64]{1,0}) tuple(%next.i, %dot.i)
}

%inner_cond (p.ic: (s32[], f32[64,64])) -> pred[] {
  %p.ic = (s32[], f32[64,64]{1,0}) parameter(0)
  %i.c = s32[] get-tuple-element(%p.ic), index=0
  %seven = s32[] constant(7)
  ROOT %lt.i = pred[] compare(%i.c, %seven), direction=LT
}

%outer_body (p.o: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p.o = (s32[], f32[64,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%p.o), index=0
  %x.o = f32[64,64]{1,0} get-tuple-element(%p.o), index=1
  %one.i = s32[] constant(1)
  %start.i = s32[] copy(%one.i)
  %init.i = (s32[], f32[64,64]{1,0}) tuple(%start.i, %x.o)
  %while.i = (s32[], f32[64,64]{1,0}) while(%init.i), condition=%inner_cond, body=%inner_body
  %y.o = f32[64,64]{1,0} get-tuple-element(%while.i), index=1
  %one = s32[] constant(1)
  %next.o = s32[] add(%j, %one)
  ROOT %t.o = (s32[], f32[64,64]{1,0}) tuple(%next.o, %y.o)
}

%outer_cond (p.oc: (s32[], f32[64,64])) -> pred[] {
  %p.oc = (s32[], f32[64,64]{1,0}) parameter(0)
  %j.c = s32[] get-tuple-element(%p.oc), index=0
  %four = s32[] constant(4)
  ROOT %lt.o = pred[] compare(%j.c, %four), direction=LT
}

ENTRY %main (x: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %dot.e = f32[64,64]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %zero = s32[] constant(0)
  %init.o = (s32[], f32[64,64]{1,0}) tuple(%zero, %dot.e)
  %while.o = (s32[], f32[64,64]{1,0}) while(%init.o), condition=%outer_cond, body=%outer_body
  ROOT %out = f32[64,64]{1,0} get-tuple-element(%while.o), index=1
}
"""


def test_a_loop_body_counts_as_often_as_it_runs():
  moved = hlo_traffic.traffic(LOOPS)
  assert [(loop.body, loop.parent, loop.trips, loop.runs) for loop in moved["loops"]] == [
      ("outer_body", "main", 4, 4),
      ("inner_body", "outer_body", 3, 4 * 3),
  ]
  matrix, scalar = 64 * 64 * 4, 4
  dot = 3 * matrix  # reads its operand twice, writes its result
  outer = 2 * scalar + 3 * scalar  # the inner counter's copy; the outer counter's add
  inner = dot + 3 * scalar  # the dot; the inner counter's add
  assert moved["hbm_bytes"] == dot + 4 * outer + 12 * inner


def test_xla_flops_count_every_run_of_a_loop_body():
  # XLA's cost analysis counts each body once: the entry's dot and the inner
  # body's. Run: the entry's and 4 x 3 of the inner body's.
  dot = 2 * 64 * 64 * 64
  counted = hlo_traffic._computation_flops(LOOPS, "main")
  assert counted == pytest.approx(2 * dot, rel=1e-3)
  loops = hlo_traffic.traffic(LOOPS)["loops"]
  assert hlo_traffic.flops_as_run(LOOPS, loops, counted) == pytest.approx(13 * dot, rel=1e-3)


def test_a_trip_count_is_read_from_the_backend_config_or_else_not_guessed():
  # XLA's CPU compiler states it.
  known = (
      "w",
      "()",
      "while",
      ["t"],
      'condition=%c, body=%b, backend_config={"known_trip_count":{"n":"9"}}',
  )
  assert hlo_traffic.trip_count(known, [], {}) == 9
  # A condition that compares nothing with a constant: unknown, counted once.
  assert [loop.trips for loop in hlo_traffic.traffic(HLO)["loops"]] == [None]


GATHER = """HloModule jit_rows

%rows_of (table.1: f32[100,128], idx.1: s32[2,1]) -> f32[2,128] {
  %table.1 = f32[100,128]{1,0} parameter(0)
  %idx.1 = s32[2,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[2,128]{1,0} gather(%table.1, %idx.1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}
}

ENTRY %main (table: f32[100,128], idx: s32[2,1]) -> (f32[2,128], f32[2,128]) {
  %table = f32[100,128]{1,0} parameter(0)
  %idx = s32[2,1]{1,0} parameter(1)
  %gather.2 = f32[2,128]{1,0} gather(%table, %idx), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}
  %fusion.5 = f32[2,128]{1,0} fusion(%table, %idx), kind=kLoop, calls=%rows_of
  ROOT %both = (f32[2,128]{1,0}, f32[2,128]{1,0}) tuple(%gather.2, %fusion.5)
}
"""


def test_a_gather_reads_the_rows_it_returns():
  # The device epoch's batches: a few rows of the whole dataset on the chip.
  rows, indices = 2 * 128 * 4, 2 * 4
  one = rows + indices + rows  # two rows read, the indices, two rows written
  assert hlo_traffic.traffic(GATHER)["hbm_bytes"] == 2 * one  # alone and fused
