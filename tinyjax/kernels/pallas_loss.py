"""The lm_head and next-token loss as Pallas kernels that keep every logit on chip (no [tokens, V] array in HBM).

Same math and outputs as loss._local_loss_and_grads: for per-token weights w and z-loss weight z,
  loss = Σ w·(logz - logit_target) + z·Σ w·logz²,   d/dlogits = s·softmax - w·onehot(target),  s = w·(1 + 2z·logz),
logits = x @ head in the compute dtype, accumulated in fp32 and rounded to the compute dtype (as loss._logits's dot
outputs it; Levanter/Marin's lm_head matmul does the same), then fp32; the backward matmuls take compute-dtype
operands and accumulate in fp32.

Logits are recomputed instead of stored (Cut Cross-Entropy's trade): four [tokens, D] x [D, V] matmuls instead of
the fused XLA loss's three, and HBM traffic of the inputs and outputs plus the tiles' re-reads (`hbm_bytes`), not
five or six round trips of every block's fp32 logits.

  kernel A  grid over token blocks, one pass over the vocab blocks (flash attention's forward): per tile the
            logits, the online max m and sum l = Σ exp(logit - m), the target's logit (an iota compare, no
            gather), and acc = Σ p·headᵀ with p = exp(logit - m) (the target's column left out), rescaled by
            exp(m_old - m_new) as m grows. Out: logz = m + log l and the softmax-weighted head acc / l (fp32).
            Then, elementwise in JAX: dx = s·acc/l + (s·p_target - w)·head[:, target]ᵀ (a gather, no matmul;
            on a TPU XLA transposes the head for it: one more read and write of it a call, O(D·V), not per token).
  kernel B  grid over vocab blocks: over token blocks, recomputes logits and g (from A's logz), dhead_blk += xᵀ @ g.
A rounds p, not g, to the compute dtype for its matmul (in bf16 as close to exact as loss.py's rounding of g: the
tests measure both). The target's column stays out of acc, so that a confident token's small gradient is not the
difference of two O(1) fp32 terms: its coefficient s·p_target - w is formed directly, as loss.py forms g (at z = 0
and 1 - p_target ~ 2e-5, median per-token dx error 2.7e-3 with the column out, 4.7e-3 in, 3.4e-3 in loss.py).

The kernels are named pallas_loss_{dx|dhead}_{rows}x{cols} (their tiles): the roofline (hardware/roofline.py)
reads its FLOPs and the tiles' HBM re-reads from that name and the operands' shapes.

Two backends, one tile math (`_logits`, `_online`, `_grad`):
  tpu  Mosaic: 2-D grids whose second axis is the pipelined reduction (A: vocab blocks; B: token blocks), the
       accumulators in the resident output blocks, pl.when init/finalize; B works on transposed [cols, rows] tiles
       so that its per-token statistics are lane-dense [1, rows] rows.
  gpu  Triton: 1-D grids, a lax.fori_loop over the other axis, fp32 accumulators in registers; Triton tensors have
       power-of-two sizes, so D is split into power-of-two chunks (192 = 128 + 64).
Tokens are padded to the token blocks with weight 0, the vocabulary to the vocab blocks with -inf logits (no copy
when the tiles divide them, as the defaults do at c4's shapes).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiles: kernel A (tokens_a rows x vocab_a columns) re-reads the head once per token block, so it wants many
  rows; kernel B (tokens_b x vocab_b) re-reads x once per vocab block, so it wants many columns."""
  tokens_a: int
  vocab_a: int
  tokens_b: int
  vocab_b: int


def default_blocks(backend: str, tokens: int, dim: int, vocab: int) -> Blocks:
  """Tiles the target's compiler accepts at every shipped D, 64 ... 512 (the slow compile test checks them).

  TPU (Mosaic): as large as fit 16 MiB of scoped VMEM (v5p's default; all a v4 core has) with ~3 MiB to spare
  (the need grows by up to ~2 MiB with the surrounding module), since a grid step costs ~0.35 us (the Pallas TPU
  pipelining guide). A holds a [rows, cols] fp32 logits tile, its exp and the [rows, D] fp32 accumulator: 1024 x
  768 at D <= 256 (12.5 MiB at D 256, by bisecting vmem_limit_bytes of the deviceless v5p compile), 1024 x 384 at
  D <= 512 (11.3 MiB; x 768 takes 14.6), 1024 x 256 above; B 1024 x 768. 256, 384 and 768 divide V = 128,256.
  GPU (Triton): the fp32 accumulators (acc [rows, D] in A, dhead [D, cols] in B) and the logits tile live in
  registers; GPU_TILES keeps every kernel within 255 registers a thread at 8 warps without spilling (ptxas -v on
  the PTX of the deviceless H100 compile; A at 128 x 128 spills from D 192, B at 64 x 128 at D 256).
  Small problems shrink the token tiles; vocab tiles prefer a divisor of V (no padded copy of the head)."""
  if backend == "tpu":
    cols_a = 768 if dim <= 256 else 384 if dim <= 512 else 256
    fit = lambda n: min(n, _round_up(tokens, 128))
    return Blocks(fit(1024), _vocab_tile(vocab, cols_a, 128), fit(1024), _vocab_tile(vocab, 768, 128))
  fit = lambda n: min(n, max(16, pl.next_power_of_2(tokens)))
  (rows_a, cols_a), (rows_b, cols_b) = next(tiles for d, *tiles in GPU_TILES if dim <= d)
  return Blocks(fit(rows_a), cols_a, fit(rows_b), cols_b)


# GPU tiles by D: (largest D, A's (rows, cols), B's (rows, cols)); registers a thread (ptxas -v, sm_90a) at D = 64,
# 128, 192, 256, 512: A 181, 255, 237, 254, 255; B 255, 255, 255, 212, 210.
GPU_TILES = ((128, (128, 128), (64, 128)), (192, (128, 64), (64, 128)), (256, (128, 64), (32, 128)),
             (512, (64, 32), (32, 64)), (math.inf, (32, 32), (16, 64)))


def _vocab_tile(vocab: int, target: int, lanes: int) -> int:
  """The largest multiple of `lanes` <= target dividing V, if at least target / 2; else target (V is padded)."""
  fits = [c for c in range(lanes, target + 1, lanes) if vocab % c == 0]
  return fits[-1] if fits and 2 * fits[-1] >= target else target


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


GPU_PARAMS = {"num_warps": 8, "num_stages": 2}
TPU_VMEM_LIMIT = 16 * 2 ** 20  # v5p's scoped default, all of a v4 core's VMEM (pallas/mosaic/tpu_info.py)


# ---- the tile math both backends share (fp32; per-token statistics broadcast along the tile's columns) -------

def _masked(logits, col0, vocab: int, axis: int):
  """fp32 logits with their global column ids along `axis`; columns past the vocabulary (padding) are -inf."""
  cols = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, axis)
  return jnp.where(cols < vocab, logits, -jnp.inf), cols


def _rounded(acc, dtype):
  """An fp32-accumulated logits tile rounded to the compute dtype and back (loss._logits; a no-op in fp32)."""
  return acc.astype(dtype).astype(jnp.float32)


def _logits(xs_nD, heads_Dv, col0, vocab: int):
  """fp32 [rows, cols] logits of one tile (x and the head as matching chunks of D) and their column ids."""
  acc = sum(jnp.dot(x, h, preferred_element_type=jnp.float32) for x, h in zip(xs_nD, heads_Dv))
  return _masked(_rounded(acc, xs_nD[0].dtype), col0, vocab, 1)


def _online(m_n1, l_n1, t_n1, logits_nv, cols_nv, target_n1):
  """One vocab tile into the running max m, sum l = Σ exp(logit - m) and target logit t; also the factor
  exp(m_old - m_new) that rescales the p @ headᵀ accumulator, and p = exp(logit - m_new) with the target's column
  zeroed (its term is added in fp32 outside). The first tile holds a real column, so m is finite after it."""
  m_new = jnp.maximum(m_n1, jnp.max(logits_nv, axis=1, keepdims=True))
  alpha_n1 = jnp.exp(m_n1 - m_new)
  p_nv = jnp.exp(logits_nv - m_new)
  is_target = cols_nv == target_n1
  l_new = l_n1 * alpha_n1 + jnp.sum(p_nv, axis=1, keepdims=True)
  t_new = t_n1 + jnp.sum(jnp.where(is_target, logits_nv, 0.0), axis=1, keepdims=True)
  return m_new, l_new, t_new, alpha_n1, jnp.where(is_target, 0.0, p_nv)


def _grad(logits_nv, cols_nv, logz_n1, w_n1, target_n1, z_weight: float):
  """d loss / d logits of one tile: w·(1 + 2z·logz)·softmax - w·onehot (0 in padded rows, w = 0, and columns)."""
  scale_n1 = w_n1 * (1.0 + 2.0 * z_weight * logz_n1)
  return scale_n1 * jnp.exp(logits_nv - logz_n1) - jnp.where(cols_nv == target_n1, w_n1, 0.0)


def _dot_nt(g_nv, head_Dv):  # g @ headᵀ -> [n, D]
  return lax.dot_general(g_nv, head_Dv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(x_nD, g_nv):  # xᵀ @ g -> [D, v] (contracting the leading dims)
  return lax.dot_general(x_nD, g_nv, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---- TPU (Mosaic) ------------------------------------------------------------------------------------------------

def _tpu_a(x_ref, head_ref, t_ref, acc_ref, logz_ref, tgt_ref, m_sc, l_sc, *, nv, bv, vocab):
  """Grid (token block i, vocab block j): acc, the target logit and m, l summed over j (the output blocks stay in
  VMEM while i is unchanged); at the last j acc becomes acc / l and logz = m + log l."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...], tgt_ref[...], acc_ref[...] = (jnp.zeros(r.shape, jnp.float32) for r in (l_sc, tgt_ref, acc_ref))

  head = head_ref[...]
  logits, cols = _logits([x_ref[...]], [head], j * bv, vocab)
  m, l, tgt, alpha, p = _online(m_sc[...], l_sc[...], tgt_ref[...], logits, cols, t_ref[...])
  m_sc[...], l_sc[...], tgt_ref[...] = m, l, tgt
  acc_ref[...] = alpha * acc_ref[...] + _dot_nt(p.astype(head.dtype), head)

  @pl.when(j == nv - 1)
  def _():
    acc_ref[...] = acc_ref[...] / l_sc[...]
    logz_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _tpu_b(xt_ref, head_ref, t_ref, w_ref, logz_ref, dhead_ref, *, bv, vocab, z):
  """Grid (vocab block j, token block i), transposed tiles [cols, rows]: the row statistics come as lane-dense
  [1, rows] rows (a [rows, 1] column re-read per vocab block would move 128 padded lanes per value). dhead's block
  stays in VMEM over i (consecutive revisits) and sums there."""
  @pl.when(pl.program_id(1) == 0)
  def _():
    dhead_ref[...] = jnp.zeros(dhead_ref.shape, jnp.float32)

  xt = xt_ref[...]
  logits_t, cols_t = _masked(_rounded(_dot_tn(head_ref[...], xt), xt.dtype), pl.program_id(0) * bv, vocab, 0)
  g_t = _grad(logits_t, cols_t, logz_ref[...], w_ref[...], t_ref[...], z)
  dhead_ref[...] += _dot_nt(xt, g_t.astype(xt.dtype))


def _tpu(x_ND, head_DV, t_N1, w_N1, z, vocab, blocks: Blocks, interpret):
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  (N, D), V = x_ND.shape, head_DV.shape[1]
  bn, bv = blocks.tokens_a, blocks.vocab_a
  # A's per-token blocks change once per token block (every V / bv steps): single buffers, whose synchronous copy
  # then costs ~1 us per token block, free the VMEM that a second one takes (2.2 MiB at D 192, 3 MiB at D 512: a
  # [rows, 1] column pads to 128 lanes).
  once = lambda cols: pl.BlockSpec((bn, cols), lambda i, j: (i, 0), pipeline_mode=pl.Buffered(1))
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=TPU_VMEM_LIMIT)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  wh_ND, logz_N1, tgt_N1 = pl.pallas_call(
      functools.partial(_tpu_a, nv=V // bv, bv=bv, vocab=vocab),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(N // bn, V // bv),
          in_specs=[once(D), pl.BlockSpec((D, bv), lambda i, j: (0, j)), once(1)],
          out_specs=[once(D), once(1), once(1)],
          scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 2),
      out_shape=[f32(N, D), f32(N, 1), f32(N, 1)],
      compiler_params=params, interpret=interpret, name=f"pallas_loss_dx_{bn}x{bv}")(x_ND, head_DV, t_N1)
  bn, bv = blocks.tokens_b, blocks.vocab_b
  row = pl.BlockSpec((1, bn), lambda j, i: (0, i))
  dhead_DV = pl.pallas_call(
      functools.partial(_tpu_b, bv=bv, vocab=vocab, z=z),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(V // bv, N // bn),
          in_specs=[pl.BlockSpec((D, bn), lambda j, i: (0, i)), pl.BlockSpec((D, bv), lambda j, i: (0, j)),
                    row, row, row],
          out_specs=pl.BlockSpec((D, bv), lambda j, i: (0, j))),
      out_shape=f32(D, V),
      compiler_params=params, interpret=interpret, name=f"pallas_loss_dhead_{bn}x{bv}")(
          x_ND.T, head_DV, *(a.reshape(1, N) for a in (t_N1, w_N1, logz_N1)))
  return wh_ND, logz_N1, tgt_N1, dhead_DV


# ---- GPU (Triton) ------------------------------------------------------------------------------------------------

def _chunks(dim: int) -> tuple[tuple[int, int], ...]:
  """D as power-of-two (offset, size) chunks >= 16 (Triton's tensors and dot K): 192 -> 128 + 64, not padded to 256
  (a third more MMA work)."""
  sizes = [1 << b for b in range(dim.bit_length() - 1, 3, -1) if dim & (1 << b)]
  return tuple((sum(sizes[:k]), s) for k, s in enumerate(sizes))


def _gpu_a(x_ref, head_ref, t_ref, wh_ref, logz_ref, tgt_ref, *, nv, bv, vocab):
  """One token block: a fori_loop over the vocab blocks carries m, l, the target logit and acc (D in
  power-of-two chunks) in registers."""
  chunks = _chunks(x_ref.shape[1])
  xs = [x_ref[:, pl.ds(o, s)] for o, s in chunks]
  t = t_ref[...][:, None]

  def body(j, carry):
    m, l, tgt, accs = carry
    heads = [head_ref[pl.ds(o, s), pl.ds(j * bv, bv)] for o, s in chunks]
    logits, cols = _logits(xs, heads, j * bv, vocab)
    m, l, tgt, alpha, p = _online(m, l, tgt, logits, cols, t)
    p = p.astype(heads[0].dtype)
    return m, l, tgt, tuple(alpha * acc + _dot_nt(p, h) for acc, h in zip(accs, heads))
  n = (xs[0].shape[0], 1)
  init = (jnp.full(n, -jnp.inf), jnp.zeros(n), jnp.zeros(n), tuple(jnp.zeros(x.shape, jnp.float32) for x in xs))
  m, l, tgt, accs = lax.fori_loop(0, nv, body, init)
  for (o, s), acc in zip(chunks, accs):
    wh_ref[:, pl.ds(o, s)] = acc / l
  logz_ref[...], tgt_ref[...] = (m + jnp.log(l))[:, 0], tgt[:, 0]


def _gpu_b(x_ref, head_ref, t_ref, w_ref, logz_ref, dhead_ref, *, nt, bn, bv, vocab, z):
  """One vocab block: a fori_loop over the token blocks sums dhead's block in registers (fp32)."""
  chunks = _chunks(head_ref.shape[0])
  heads = [head_ref[pl.ds(o, s), :] for o, s in chunks]
  col0 = pl.program_id(0) * bv

  def body(i, accs):
    rows = pl.ds(i * bn, bn)
    xs = [x_ref[rows, pl.ds(o, s)] for o, s in chunks]
    t, w, logz = (r[rows][:, None] for r in (t_ref, w_ref, logz_ref))
    logits, cols = _logits(xs, heads, col0, vocab)
    g = _grad(logits, cols, logz, w, t, z).astype(xs[0].dtype)
    return tuple(acc + _dot_tn(x, g) for acc, x in zip(accs, xs))
  accs = lax.fori_loop(0, nt, body, tuple(jnp.zeros(h.shape, jnp.float32) for h in heads))
  for (o, s), acc in zip(chunks, accs):
    dhead_ref[pl.ds(o, s), :] = acc


def _gpu(x_ND, head_DV, t_N1, w_N1, z, vocab, blocks: Blocks, interpret):
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  (N, D), V = x_ND.shape, head_DV.shape[1]
  t_N, w_N = t_N1[:, 0], w_N1[:, 0]
  params = plgpu.CompilerParams(**GPU_PARAMS)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  bn, bv = blocks.tokens_a, blocks.vocab_a
  vec = pl.BlockSpec((bn,), lambda i: (i,))
  wh_ND, logz_N, tgt_N = pl.pallas_call(
      functools.partial(_gpu_a, nv=V // bv, bv=bv, vocab=vocab), grid=(N // bn,),
      in_specs=[pl.BlockSpec((bn, D), lambda i: (i, 0)), pl.BlockSpec((D, V), lambda i: (0, 0)), vec],
      out_specs=[pl.BlockSpec((bn, D), lambda i: (i, 0)), vec, vec],
      out_shape=[f32(N, D), f32(N), f32(N)],
      compiler_params=params, interpret=interpret, name=f"pallas_loss_dx_{bn}x{bv}")(x_ND, head_DV, t_N)
  bn, bv = blocks.tokens_b, blocks.vocab_b
  whole = pl.BlockSpec((N,), lambda j: (0,))
  dhead_DV = pl.pallas_call(
      functools.partial(_gpu_b, nt=N // bn, bn=bn, bv=bv, vocab=vocab, z=z), grid=(V // bv,),
      in_specs=[pl.BlockSpec((N, D), lambda j: (0, 0)), pl.BlockSpec((D, bv), lambda j: (0, j)), whole, whole,
                whole],
      out_specs=pl.BlockSpec((D, bv), lambda j: (0, j)),
      out_shape=f32(D, V),
      compiler_params=params, interpret=interpret, name=f"pallas_loss_dhead_{bn}x{bv}")(x_ND, head_DV, t_N, w_N, logz_N)
  return wh_ND, logz_N[:, None], tgt_N[:, None], dhead_DV


# ---- the entry point ---------------------------------------------------------------------------------------------

def _pad(a, n: int, axis: int):
  """a padded with zeros along `axis` up to n (no copy when it already has n)."""
  if a.shape[axis] == n:
    return a
  return jnp.pad(a, [(0, n - a.shape[axis]) if k == axis else (0, 0) for k in range(a.ndim)])


def loss_and_grads(x_ND, head_DV, targets_N, weights_N, z_weight: float, *, backend: str,
                   blocks: Blocks | None = None, dtype=None, interpret: bool = False):
  """((Σ w·nll, Σ w·logz²), dx [N, D] in x's dtype, dhead [D, V] fp32) of Σ w·(nll + z_weight·logz²), the
  matmuls in `dtype` (default: x's dtype). One device's tokens: under a mesh call it per shard (shard_map), as
  loss._loss_and_grads does; the kernels are opaque to GSPMD."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown Pallas loss backend {backend!r}; allowed: {', '.join(BACKENDS)}")
  (N, D), V = x_ND.shape, head_DV.shape[1]
  b = blocks or default_blocks(backend, N, D, V)
  dtype = jnp.dtype(dtype or x_ND.dtype)
  n = _round_up(N, math.lcm(b.tokens_a, b.tokens_b))
  v = _round_up(V, math.lcm(b.vocab_a, b.vocab_b))
  d = _round_up(D, 16) if backend == "gpu" else D  # Triton's dot wants K >= 16 (every shipped D is a multiple)
  head_c = head_DV.astype(dtype)
  x_nd = _pad(_pad(x_ND.astype(dtype), n, 0), d, 1)
  head_dv = _pad(_pad(head_c, v, 1), d, 0)
  t_n1 = _pad(targets_N.astype(jnp.int32), n, 0)[:, None]
  w_n1 = _pad(weights_N.astype(jnp.float32), n, 0)[:, None]  # padded tokens weigh 0: no loss, no gradient
  kernels = {"tpu": _tpu, "gpu": _gpu}[backend]
  wh_nd, logz_n1, tgt_n1, dhead_dv = kernels(x_nd, head_dv, t_n1, w_n1, float(z_weight), V, b, interpret)
  w_N, logz_N, tgt_N = weights_N.astype(jnp.float32), logz_n1[:N, 0], tgt_n1[:N, 0]
  # dx = Σ_v g·head_vᵀ = s·(Σ_{v≠t} softmax_v·head_vᵀ) + (s·softmax_t - w)·head_tᵀ: A's output is the first sum
  # over s; the target's column [N, D] is a gather, and its coefficient (small for a confident token) stays fp32.
  scale_N = w_N * (1.0 + 2.0 * z_weight * logz_N)
  head_t_ND = jnp.take(head_c, targets_N, axis=1).T.astype(jnp.float32)
  coef_N = scale_N * jnp.exp(tgt_N - logz_N) - w_N
  dx_ND = scale_N[:, None] * wh_nd[:N, :D] + coef_N[:, None] * head_t_ND
  sums = (jnp.sum(w_N * (logz_N - tgt_N)), jnp.sum(w_N * logz_N * logz_N))
  return sums, dx_ND.astype(x_ND.dtype), dhead_dv[:D, :V]


def hbm_bytes(tokens: int, dim: int, vocab: int, backend: str, blocks: Blocks | None = None,
              itemsize: int = 2) -> int:
  """HBM bytes the two kernels move with every tile re-read counted (a compiled module's roofline sees a custom
  call's operands once): A reads the head once per token block, x and the targets once, and writes the fp32
  weighted head, logz and the target logit; B reads the head once, x and the row statistics once per vocab block,
  and writes the fp32 dhead. dx's elementwise epilogue (and on a TPU XLA's relayout of the head for its gather)
  are XLA's, not counted. On a GPU an upper bound: concurrent programs sweep the same head / x tiles in step, and
  the L2 cache serves most re-reads."""
  b = blocks or default_blocks(backend, tokens, dim, vocab)
  head, x = dim * vocab * itemsize, tokens * dim * itemsize
  a = -(-tokens // b.tokens_a) * head + x + 4 * tokens * dim + 4 * 3 * tokens
  bb = head + -(-vocab // b.vocab_b) * (x + 4 * 3 * tokens) + 4 * dim * vocab
  return a + bb
