"""tinyjax/hardware/roofline.py: the counting rules on small modules whose bytes and FLOPs are written by hand, and
the roofline of a real compiled step against the FLOP audit."""
from __future__ import annotations

import pytest

from tinyjax.hardware import roofline

CHIP = roofline.Chip(peak_flops=1e12, hbm_bandwidth=1e9, link_bandwidth=1e8)

# A scan of 8 trips whose body reads a f32[256] slice of a [8,256] stack, scales it and writes it back in place.
LOOP = """HloModule loop

%scale (p0: f32[8,256], p1: s32[]) -> f32[1,256] {
  %p0 = f32[8,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,256}
  %two = f32[] constant(2)
  %b = f32[1,256]{1,0} broadcast(%two), dimensions={}
  ROOT %m = f32[1,256]{1,0} multiply(%ds, %b), metadata={op_name="jit(step)/jvp(lm_head_loss)/while/body/mul"}
}

%update (q0: f32[8,256], q1: f32[1,256], q2: s32[]) -> f32[8,256] {
  %q0 = f32[8,256]{1,0} parameter(0)
  %q1 = f32[1,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[8,256]{1,0} dynamic-update-slice(%q0, %q1, %q2, %zero.1)
}

%add_one (a0: s32[]) -> s32[] {
  %a0 = s32[] parameter(0)
  %one = s32[] constant(1)
  ROOT %a = s32[] add(%a0, %one)
}

%body (arg: (s32[], f32[8,256])) -> (s32[], f32[8,256]) {
  %arg = (s32[], f32[8,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[8,256]{1,0} get-tuple-element(%arg), index=1
  %scaled = f32[1,256]{1,0} fusion(%x, %i), kind=kLoop, calls=%scale, metadata={op_name="jit(step)/jvp(lm_head_loss)/while/body/mul"}
  %written = f32[8,256]{1,0} fusion(%x, %scaled, %i), kind=kLoop, calls=%update, metadata={op_name="jit(step)/jvp(lm_head_loss)/while/body/dynamic_update_slice"}
  %next = s32[] fusion(%i), kind=kLoop, calls=%add_one
  ROOT %t = (s32[], f32[8,256]{1,0}) tuple(%next, %written)
}

%cond (c: (s32[], f32[8,256])) -> pred[] {
  %c = (s32[], f32[8,256]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

ENTRY %main (x0: f32[8,256]) -> f32[8,256] {
  %x0 = f32[8,256]{1,0} parameter(0)
  %i0 = s32[] constant(0)
  %init = (s32[], f32[8,256]{1,0}) tuple(%i0, %x0)
  %w = (s32[], f32[8,256]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  ROOT %out = f32[8,256]{1,0} get-tuple-element(%w), index=1
}
"""


def _by_name(text: str) -> dict[str, roofline.Kernel]:
  ks, unknown = roofline.kernels(text)
  assert unknown == 0
  return {k.name: k for k in ks}


def test_loop_body_counts_times_its_trip_count_and_slices_and_in_place_updates_as_the_slice():
  ks = _by_name(LOOP)
  assert set(ks) == {"scaled", "written", "next", "lt"}  # tuples, get-tuple-element, parameters, constants: free
  assert all(k.trips == 8 for k in ks.values())
  # scaled: reads the [1,256] slice of its [8,256] operand (1 KiB) and the s32 index, writes [1,256].
  assert ks["scaled"].hbm_bytes == 1024 + 4 + 1024
  # written: in place: the stack it updates is not read; it reads the update and the index, writes the update.
  assert ks["written"].hbm_bytes == 1024 + 4 + 1024
  assert ks["scaled"].part == "loss" and ks["next"].part == "other"  # no source metadata anywhere: other
  rep = roofline.report(LOOP, CHIP, credited_flops=0.0, tokens=1)
  assert ks["lt"].hbm_bytes == 4 + 4 + 1  # the condition runs every trip too
  assert rep["hbm_bytes"] == 8 * (2052 + 2052 + 8 + 9)
  assert rep["bound_s"] == pytest.approx(rep["hbm_bytes"] / 1e9)


def test_trip_count_from_the_condition_when_the_compiler_gives_none():
  text = LOOP.replace(', backend_config={"known_trip_count":{"n":"8"}}', "").replace("constant(8)", "constant(5)")
  assert {k.trips for k in _by_name(text).values()} == {5}
  unknown = text.replace("direction=LT", "direction=GT")  # not an i < N loop: counted once, and said so
  ks, n_unknown = roofline.kernels(unknown)
  assert n_unknown == 1 and {k.trips for k in ks} == {1}


GEMM = """HloModule gemm

%gemm (g0: bf16[64,32], g1: bf16[32,128]) -> bf16[64,128] {
  %g0 = bf16[64,32]{1,0} parameter(0)
  %g1 = bf16[32,128]{1,0} parameter(1)
  ROOT %d = bf16[64,128]{1,0} dot(%g0, %g1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[64,32], b: bf16[32,128], c: f32[1024]) -> (bf16[64,128], (bf16[64,128], s8[4096]), f32[1024]) {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,128]{1,0} parameter(1)
  %c = f32[1024]{0} parameter(2)
  %fused = bf16[64,128]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm, metadata={op_name="jit(step)/jvp(Transformer)/layers_0/mlp/up_proj/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %cublas = (bf16[64,128]{1,0}, s8[4096]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp(Transformer))/layers_0/self_attn/q_proj/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %ar = f32[1024]{0} all-reduce(%c), replica_groups={{0,1,2,3}}, to_apply=%gemm, metadata={op_name="jit(step)/optimizer/psum"}
  ROOT %t = (bf16[64,128]{1,0}, (bf16[64,128]{1,0}, s8[4096]{0}), f32[1024]{0}) tuple(%fused, %cublas, %ar)
}
"""


def test_gemm_flops_in_a_fusion_and_a_cublas_call_and_a_collective_over_the_interconnect():
  ks = _by_name(GEMM)
  flops = 2 * 64 * 128 * 32
  assert ks["fused"].flops == flops and ks["fused"].kind == "fusion:__triton_gemm"
  assert ks["fused"].hbm_bytes == 64 * 32 * 2 + 32 * 128 * 2 + 64 * 128 * 2
  assert ks["cublas"].flops == flops and ks["cublas"].kind == "custom-call:__cublas$gemm"
  assert ks["cublas"].hbm_bytes == ks["fused"].hbm_bytes  # cuBLAS's s8 workspace is scratch, not traffic
  assert ks["fused"].part == "projections_mlp" and ks["cublas"].part == "projections_mlp"  # q_proj inside self_attn
  ar = ks["ar"]
  assert (ar.part, ar.hbm_bytes, ar.flops) == ("collectives", 8192, 0.0)
  assert ar.link_bytes == pytest.approx(4096 * 2 * 3 / 4)  # a ring all-reduce over 4: 2(n-1)/n of the payload
  assert ar.seconds(CHIP.peak_flops, CHIP.hbm_bandwidth, CHIP.link_bandwidth) == pytest.approx(6144 / 1e8)


def test_a_pallas_attention_kernel_is_estimated_from_its_shapes_and_role():
  text = """HloModule attn

ENTRY %main (q: bf16[2,256,4,64], k: bf16[2,256,4,64], v: bf16[2,256,4,64]) -> bf16[2,256,4,64] {
  %q = bf16[2,256,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,256,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,256,4,64]{3,2,1,0} parameter(2)
  ROOT %p = bf16[2,256,4,64]{3,2,1,0} custom-call(%q, %k, %v), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(Transformer)/layers_0/self_attn/jit(mha)/mha_forward/pallas_call"}
}
"""
  ks, _ = roofline.kernels(text, seq_len=256, causal_fraction=0.625)
  (k,) = ks
  assert k.part == "attention" and k.estimated_flops
  assert k.flops == 2 * 2.0 * (2 * 256 * 4 * 64) * 256 * 0.625  # QK and PV over the causal share of the blocks
  assert k.hbm_bytes == 4 * 2 * 256 * 4 * 64 * 2


def test_on_chip_memory_is_not_hbm_and_a_tpu_convolution_counts_its_real_taps():
  # XLA TPU batches a matmul as a convolution whose window slides over a padded size-1 dimension: 32 taps, 1 real.
  text = """HloModule tpu

%conv (w: bf16[448,192,1], x: bf16[32,1024,448]) -> bf16[32,1024,192] {
  %w = bf16[448,192,1]{0,1,2:T(8,128)(2,1)S(1)} parameter(0)
  %x = bf16[32,1024,448]{1,2,0:T(8,128)(2,1)} parameter(1)
  ROOT %c = bf16[32,1024,192]{1,2,0:T(8,128)(2,1)} convolution(%w, %x), window={size=32 pad=31_31 rhs_reversal=1}, dim_labels=fb0_0oi->0fb
}

ENTRY %main (w0: bf16[448,192,1], x0: bf16[32,1024,448]) -> bf16[32,1024,192] {
  %w0 = bf16[448,192,1]{0,1,2:T(8,128)(2,1)S(1)} parameter(0)
  %x0 = bf16[32,1024,448]{1,2,0:T(8,128)(2,1)} parameter(1)
  ROOT %f = bf16[32,1024,192]{1,2,0:T(8,128)(2,1)} fusion(%w0, %x0), kind=kOutput, calls=%conv
}
"""
  (k,) = roofline.kernels(text)[0]
  assert k.flops == 2 * (32 * 1024 * 192) * 448
  assert k.hbm_bytes == (32 * 1024 * 448 + 32 * 1024 * 192) * 2  # the weight sits in VMEM (S(1))


@pytest.mark.parametrize("op_name, part", [
    ("jit(step)/jvp(lm_head_loss)/while/body/closed_call/dot_general", "loss"),
    ("jit(step)/transpose(jvp(Transformer))/layers_3/self_attn/mha_backward/pallas_call", "attention"),
    ("jit(step)/jvp(Transformer)/layers_0/self_attn/q_norm/mul", "guard_norms"),
    ("jit(step)/jvp(Transformer)/layers_1/mlp/down_proj/dot_general", "projections_mlp"),
    ("jit(step)/optimizer/mul", "optimizer"),
    ("jit(step)/guard/reduce_sum", "guard_norms"),
    ("jit(step)/jvp(Transformer)/jit(_take)/gather", "other"),
])
def test_parts_from_name_scopes(op_name, part):
  assert roofline.part_of(op_name) == part


def test_mfu_ceiling_is_credited_compute_over_the_bound():
  rep = roofline.report(GEMM, CHIP, credited_flops=4e9, tokens=1000, devices=4)
  assert rep["compute_s"] == pytest.approx(4e9 / 4 / 1e12)
  assert rep["mfu_ceiling"] == pytest.approx(rep["compute_s"] / rep["bound_s"])
  assert rep["tokens_per_s_bound"] == pytest.approx(1000 / rep["bound_s"])
  assert sum(p["bound_s"] for p in rep["by_part"].values()) == pytest.approx(rep["bound_s"], rel=1e-4)
  assert rep["top"][0]["name"] == "ar"  # 61 us on the link beats 49 us of HBM traffic for each GEMM


@pytest.mark.slow
def test_the_cpu_step_module_counts_the_flops_the_audit_traces(small_cfg):
  """The compiled CPU step's matmul FLOPs (roofline) equal the jaxpr's (audit: executed + optimizer)."""
  import jax  # noqa: PLC0415
  small_cfg = small_cfg()

  from tinyjax import audit, sharding, step  # noqa: PLC0415
  mesh = sharding.make_mesh(small_cfg.mesh)
  built = step.build(small_cfg, mesh)
  planner = built.planner(small_cfg.train.train_batch_size)
  planner.info(1)
  text = planner.executables[1].as_text()
  counted = audit.flop_audit(small_cfg, mesh)
  rep = roofline.step_report(text, built.model.cfg, small_cfg.train.train_batch_size, 1, CHIP, jax.default_backend())
  expected = counted["executed_flops_per_step"] + counted["optimizer_flops_per_step"]
  assert rep["flops"] == pytest.approx(expected, rel=0.01)
  assert rep["unknown_trip_counts"] == 0
  assert rep["by_part"]["loss"]["flops"] > 0 and rep["by_part"]["optimizer"]["hbm_bytes"] > 0


def test_an_async_slice_into_on_chip_memory_reads_its_slice_once():
  """libtpu's slice-start copies part of an HBM array into on-chip memory (S(3)); its slice-done is free."""
  text = """HloModule async

ENTRY %main (w: f32[128,1024]) -> f32[32,1024] {
  %w = f32[128,1024]{1,0:T(8,128)} parameter(0)
  %s = ((f32[128,1024]{1,0:T(8,128)}), f32[32,1024]{1,0:T(8,128)S(3)}, s32[]{:S(2)}) slice-start(%w), slice={[0:32], [0:1024]}
  ROOT %d = f32[32,1024]{1,0:T(8,128)S(3)} slice-done(%s)
}
"""
  (k,) = roofline.kernels(text)[0]
  assert (k.name, k.hbm_bytes) == ("s", 32 * 1024 * 4)


def test_the_pallas_loss_kernels_count_their_matmuls_and_their_tiles_re_reads():
  text = """HloModule pallas_loss

ENTRY %main (x: bf16[4096,192], h: bf16[192,1024], t: s32[4096], w: f32[4096], z: f32[4096]) -> (bf16[4096,192], f32[192,1024]) {
  %x = bf16[4096,192]{1,0} parameter(0)
  %h = bf16[192,1024]{1,0} parameter(1)
  %t = s32[4096]{0} parameter(2)
  %w = f32[4096]{0} parameter(3)
  %z = f32[4096]{0} parameter(4)
  %dx = bf16[4096,192]{1,0} custom-call(%x, %h, %t, %w), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(lm_head_loss)/pallas_loss_dx_128x128/pallas_call"}
  %dh = f32[192,1024]{1,0} custom-call(%x, %h, %t, %w, %z), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(lm_head_loss)/pallas_loss_dhead_64x128/pallas_call"}
  ROOT %r = (bf16[4096,192]{1,0}, f32[192,1024]{1,0}) tuple(%dx, %dh)
}
"""
  x, head, rows = 4096 * 192 * 2, 192 * 1024 * 2, 4096 * 4 * 2
  for programs, head_reads, x_reads in ((1, 32, 8), (8, 4, 1)):  # 32 token blocks, 8 vocab blocks
    ks = {k.name: k for k in roofline.kernels(text, programs=programs)[0]}
    dx, dh = ks["dx"], ks["dh"]
    assert dx.part == dh.part == "loss" and dx.estimated_flops
    assert (dx.flops, dh.flops) == (2 * 2.0 * 4096 * 192 * 1024, 2 * 2.0 * 4096 * 192 * 1024)
    assert dx.hbm_bytes == x + rows + x + (head_reads - 1) * head + head
    assert dh.hbm_bytes == x + head + rows + 4096 * 4 + 192 * 1024 * 4 + (x_reads - 1) * (x + 12 * 4096)
