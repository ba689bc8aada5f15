"""tinyjax.optim pins Levanter's Muon/AdamW: routing, decay mask, schedules, and updates vs NumPy transcriptions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinyjax import config, optim

# Small Llama-shaped tree: q/o square (8x8), k/v tall (8x4 as (in, out)), gate/up wide (8x12), down tall (12x8).
D, H, KV, HD, F, V = 8, 2, 1, 4, 12, 16

# Written out here, independently of optim.NS_COEFFICIENTS (Levanter util.NEWTON_SCHULZ_COEFFICIENTS).
SIMPLE = [(3.4445, -4.7750, 2.0315)]
QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]

MUON_KERNELS = {f"layers_{i}/{m}/{n}/kernel" for i in range(2)
                for m, n in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                             ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]}


def make_params(tied=False, qk_norm=False, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)

  def w(*shape):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def layer():
    attn = {"q_proj": {"kernel": w(D, H * HD)}, "k_proj": {"kernel": w(D, KV * HD)},
            "v_proj": {"kernel": w(D, KV * HD)}, "o_proj": {"kernel": w(H * HD, D)}}
    if qk_norm:
      attn["q_norm"] = {"scale": w(HD)}
      attn["k_norm"] = {"scale": w(HD)}
    return {"input_layernorm": {"scale": w(D)}, "self_attn": attn, "post_attention_layernorm": {"scale": w(D)},
            "mlp": {"gate_proj": {"kernel": w(D, F)}, "up_proj": {"kernel": w(D, F)}, "down_proj": {"kernel": w(F, D)}}}

  params = {"embed_tokens": {"embedding": w(V, D)}, "layers_0": layer(), "layers_1": layer(), "norm": {"scale": w(D)}}
  if not tied:
    params["lm_head"] = {"kernel": w(D, V)}
  return params


def flat(tree):
  return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def muon_cfg(**overrides):
  cfg = config.base()
  o = cfg.optimizer
  o.name, o.learning_rate, o.adam_lr = "muon", 0.02, 0.004
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = 0.0, 1.0, 0.0, "linear"
  o.weight_decay, o.adam_weight_decay = 0.1, 0.05
  o.beta1, o.beta2, o.epsilon, o.muon_epsilon = 0.8, 0.98, 1e-8, 1e-5
  for k, v in overrides.items():
    setattr(o, k, v)
  return cfg


def run_steps(tx, params, grads_list, jit=False):
  """Applies tx to each gradient in turn; returns the list of updates (as flat NumPy dicts).

  Eager by default (compiling the unrolled NS graph costs seconds on CPU); jit=True where jit itself is under test.
  """
  state = tx.init(params)
  step = jax.jit(tx.update) if jit else tx.update
  out = []
  for g in grads_list:
    u, state = step(g, state, params)
    out.append({k: np.asarray(v, np.float64) for k, v in flat(u).items()})
    params = optax.apply_updates(params, u)
  return out


# ---------------- NumPy (float64) transcriptions of Levanter ----------------

def np_ns(u, steps, coeffs, eps):
  x = u / (np.linalg.norm(u) + eps)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  for i in range(steps):
    a, b, c = coeffs[i % len(coeffs)]
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if tall else x


def np_decayed(path):
  return not ("norm" in path or "embed_tokens" in path)


class NpMuon:
  """Levanter MuonConfig: Muon on block kernels; clip(Adam group only) -> Adam -> masked wd -> -adam_lr on the rest."""

  def __init__(self, o, lrs, adam_lrs, coeffs):
    self.o, self.lrs, self.adam_lrs, self.coeffs = o, lrs, adam_lrs, coeffs
    self.buf, self.m, self.v, self.t = {}, {}, {}, 0

  def step(self, params, grads):
    o, t = self.o, self.t
    adam = [k for k in grads if k not in MUON_KERNELS]
    gnorm = math.sqrt(sum(float(np.sum(grads[k] ** 2)) for k in adam))
    clip = min(1.0, o.max_grad_norm / gnorm) if o.max_grad_norm else 1.0
    adam_wd = o.adam_weight_decay if o.adam_weight_decay is not None else o.weight_decay
    upd = {}
    for k, g in grads.items():
      p = params[k]
      if k in MUON_KERNELS:
        buf = o.momentum * self.buf.get(k, 0.0) + g
        self.buf[k] = buf
        u = o.momentum * buf + g if o.nesterov else buf
        fan_in, fan_out = g.shape
        x = np_ns(u, o.backend_steps, self.coeffs, o.muon_epsilon) * math.sqrt(max(1.0, fan_out / fan_in))
        x = x + o.weight_decay * p  # every Muon kernel is decayed
        upd[k] = -self.lrs[t] * x
      else:
        g = g * clip
        m = o.beta1 * self.m.get(k, 0.0) + (1 - o.beta1) * g
        v = o.beta2 * self.v.get(k, 0.0) + (1 - o.beta2) * g * g
        self.m[k], self.v[k] = m, v
        x = (m / (1 - o.beta1 ** (t + 1))) / (np.sqrt(v / (1 - o.beta2 ** (t + 1))) + o.epsilon)
        if np_decayed(k):
          x = x + adam_wd * p
        upd[k] = -self.adam_lrs[t] * x
    self.t += 1
    return upd


def rel_err(got, want):
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ---------------- 1-2: routing and weight-decay mask ----------------

@pytest.mark.parametrize("tied,qk_norm", [(False, False), (True, False), (False, True)])
def test_labels_route_block_kernels_to_muon_and_the_rest_to_adam(tied, qk_norm):
  params = make_params(tied=tied, qk_norm=qk_norm)
  got = flat(optim.labels(params))
  muon = {k for k, v in got.items() if v == "muon"}
  adam = {k for k, v in got.items() if v == "adam"}
  assert muon == MUON_KERNELS, f"Muon group should be exactly the 14 block kernels (Levanter create_mask); got {muon}"
  expected_adam = set(flat(params)) - MUON_KERNELS
  assert adam == expected_adam, f"embedding, lm_head and every norm scale must go to Adam; got {adam}"
  assert ("lm_head/kernel" in adam) == (not tied), "lm_head (a 2-D kernel) must be routed to Adam, not Muon"
  if qk_norm:
    assert "layers_0/self_attn/q_norm/scale" in adam, "q_norm/k_norm scales must be in the Adam group"


def test_elementwise_masks_name_every_leaf_but_muons_in_params_and_in_the_optimizer_state():
  """The step's guard recomputes the elementwise updates (step._barrier_elementwise): Muon's matrices and their
  momentum are left out, everything else (embedding, lm_head, norms and their Adam moments) is in."""
  params = make_params()
  mask = flat(optim.elementwise(params))
  assert {k for k, v in mask.items() if not v} == MUON_KERNELS and len(mask) == len(flat(params))
  tx = optim.build(optim.OptimizerConfig.from_config(muon_cfg(), total_steps=10))
  state = tx.init(params)
  in_state = zip(jax.tree_util.tree_flatten_with_path(optim.elementwise_state(state))[0], jax.tree.leaves(state))
  in_state = [(p, v) for (p, v), x in in_state if jnp.issubdtype(x.dtype, jnp.floating)]  # not the step counts
  muon_leaves = [optim.param_path(p) for p, v in in_state if not v]
  adam_leaves = [optim.param_path(p) for p, v in in_state if v]
  assert len(muon_leaves) == len(MUON_KERNELS) and all("muon" in p for p in muon_leaves)  # the momentum buffers
  assert any("embed_tokens" in p and "mu" in p for p in adam_leaves) and not any("muon" in p for p in adam_leaves)
  adamw = optim.build(optim.OptimizerConfig.from_config(muon_cfg(name="adamw"), total_steps=10))
  assert all(jax.tree.leaves(optim.elementwise_state(adamw.init(params))))


def test_weight_decay_mask_decays_lm_head_and_matrices_not_embedding_or_norms():
  params = make_params(qk_norm=True)
  got = flat(optim.weight_decay_mask(params))
  decayed = {k for k, v in got.items() if v}
  want = MUON_KERNELS | {"lm_head/kernel"}
  assert decayed == want, (f"Levanter decays every Linear incl. lm_head and never norms/embedding; "
                           f"extra={decayed - want}, missing={want - decayed}")
  assert not optim.weight_decay_mask({"mlp": {"up_proj": {"bias": jnp.zeros(3)}}})["mlp"]["up_proj"]["bias"], \
      "biases must not be decayed (Levanter: path ends with 'bias')"


# ---------------- 3: Muon update == NumPy Levanter, two steps ----------------

@pytest.mark.parametrize("coefficient_type,backend_steps,nesterov", [
    ("simple", 5, True), ("quintic", 5, True), ("quintic", 6, False)])
def test_muon_two_steps_match_numpy_levanter(coefficient_type, backend_steps, nesterov):
  cfg = muon_cfg(coefficient_type=coefficient_type, backend_steps=backend_steps, nesterov=nesterov)
  total = 4
  # linear decay over all 4 steps to 0: update 0 uses lr, update 1 uses 0.75*lr (pins the step count).
  lrs, adam_lrs = [0.02, 0.015], [0.004, 0.003]
  params = make_params(seed=0)
  grads = [make_params(seed=1, scale=0.1), make_params(seed=2, scale=0.1)]
  got = run_steps(optim.make(cfg, total), params, grads, jit=coefficient_type == "simple")

  ref = NpMuon(cfg.optimizer, lrs, adam_lrs, SIMPLE if coefficient_type == "simple" else QUINTIC)
  p64 = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
  for i, g in enumerate(grads):
    want = ref.step(p64, {k: np.asarray(v, np.float64) for k, v in flat(g).items()})
    for k in want:
      err = rel_err(got[i][k], want[k])
      assert err < 1e-5, (f"step {i} {k}: update differs from the NumPy Levanter transcription (rel err {err:.2e}); "
                          "momentum/Nesterov, NS, shape scale, masked wd, clip scope or LR step is off")
    p64 = {k: p64[k] + want[k] for k in p64}


@pytest.mark.parametrize("coefficient_type", ["simple", "quintic", "polar_express", "aol"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_newton_schulz_sets_equal_a_numpy_transcription(coefficient_type, shape):
  """Levanter zeropower_via_newtonschulz5 in float64 NumPy: normalise by the Frobenius norm (+eps), iterate on the
  wide orientation, X <- aX + (bA + cA^2)X with A = XX^T, the sets used cyclically (9 steps: past every set)."""
  g = np.random.default_rng(0).standard_normal(shape)
  x = g / (np.linalg.norm(g) + 1e-5)
  x = x.T if shape[0] > shape[1] else x
  sets = {"simple": [(3.4445, -4.7750, 2.0315)],
          "quintic": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                      (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],
          "polar_express": [(8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
                            (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
                            (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750)],
          "aol": [(4.0098, -7.0585, 2.4635), (3.4585, -5.5479, 2.5959), (2.7573, -3.2939, 1.4254),
                  (2.7215, -3.0494, 1.3169)]}[coefficient_type]
  for i in range(9):
    a, b, c = sets[i % len(sets)]
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  expected = x.T if shape[0] > shape[1] else x
  got = np.asarray(optim.newton_schulz(np.asarray(g, np.float32), 9, coefficient_type, 1e-5), np.float64)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


# ---------------- 4: clipping scope ----------------

def test_clip_covers_adam_group_only_and_never_muon():
  cfg = muon_cfg(weight_decay=0.0, adam_weight_decay=None, lr_schedule="constant", decay=None,
                 epsilon=1.0, muon_epsilon=1.0, momentum=0.0, max_grad_norm=1.0)
  # epsilon=1 makes Adam's first step g/(|g|+1) depend on the clipped scale; muon_epsilon=1 makes NS depend on it.
  params = make_params()
  big_adam = make_params(seed=3)  # Adam-group norm >> 1: clipped
  small_adam = make_params(seed=3, scale=1e-3)  # Adam-group norm << 1: untouched
  tx = optim.make(cfg, 10)
  for base in (big_adam, small_adam):
    g = flat(base)
    gnorm = math.sqrt(sum(float(np.sum(np.asarray(g[k], np.float64) ** 2)) for k in g if k not in MUON_KERNELS))
    huge = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1e6 if optim.param_path(p) in MUON_KERNELS else x, base)
    u_base, u_huge = run_steps(tx, params, [base])[0], run_steps(tx, params, [huge])[0]
    c = min(1.0, 1.0 / gnorm)
    for k in g:
      if k in MUON_KERNELS:
        continue
      assert np.array_equal(u_base[k], u_huge[k]), f"{k}: a huge Muon gradient changed an Adam update (clip scope)"
      gc = np.asarray(g[k], np.float64) * c
      want = -0.004 * gc / (np.abs(gc) + 1.0)
      assert rel_err(u_base[k], want) < 1e-5, f"{k}: Adam update is not clipped by the Adam-group global norm"

  # Muon leaves: gradient norm ~ 3 with max_grad_norm 1; clipping would change NS output via muon_epsilon=1.
  g = flat(make_params(seed=4, scale=0.3))
  u = run_steps(tx, params, [make_params(seed=4, scale=0.3)])[0]
  for k in sorted(MUON_KERNELS)[:3]:
    gk = np.asarray(g[k], np.float64)
    fan_in, fan_out = gk.shape
    s = math.sqrt(max(1.0, fan_out / fan_in))
    want = -0.02 * s * np_ns(gk, 5, SIMPLE, 1.0)
    clipped = -0.02 * s * np_ns(gk / np.linalg.norm(gk), 5, SIMPLE, 1.0)
    assert rel_err(want, clipped) > 1e-2, "test is insensitive: clipping should visibly change this Muon update"
    assert rel_err(u[k], want) < 1e-5, f"{k}: Muon gradient was clipped (Levanter never clips Muon grads)"


# ---------------- 5: schedules ----------------

def sched_cfg(**overrides):
  cfg = config.base()
  for k, v in overrides.items():
    setattr(cfg.optimizer, k, v)
  return cfg


def check_schedule(cfg, peak, total, expected):
  fn = optim.schedule(optim.OptimizerConfig.from_config(cfg, total), peak)
  for step, want in expected.items():
    got = float(fn(step))
    assert abs(got - want) <= 1e-6 * peak, f"LR at step {step} = {got}, want {want} (Levanter lr_scheduler)"


def test_schedule_c4_50m_wsd_linear():
  cfg = sched_cfg(warmup=0.0, lr_schedule="linear", decay=0.8, min_lr_ratio=0.0)
  total, peak = 7629, 0.02
  decay = int(0.8 * total)  # 6103
  stable = total - decay  # 1526
  check_schedule(cfg, peak, total, {
      0: peak, stable - 1: peak, stable: peak,  # constant phase, then decay starts from peak
      stable + 3051: peak * (1 - 3051 / decay),  # midway through the decay
      total - 1: peak * (1 / decay),  # last trained step: one decay step from 0
      total: 0.0})


def test_schedule_cosine_fractional_warmup_and_min_lr():
  cfg = sched_cfg(warmup=0.05, lr_schedule="cosine", decay=None, min_lr_ratio=0.1)
  total, peak = 1000, 1.0
  w, d = 50, 950
  cos = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / d))  # noqa: E731
  check_schedule(cfg, peak, total, {0: 0.0, 25: 0.5, w: 1.0, w + 475: cos(475), total - 1: cos(d - 1), total: 0.1})


def test_schedule_warmup_in_steps_linear_decay_none_and_constant():
  cfg = sched_cfg(warmup=100, lr_schedule="linear", decay=None, min_lr_ratio=0.1)
  check_schedule(cfg, 2.0, 1000, {0: 0.0, 50: 1.0, 100: 2.0, 550: 2.0 * (1 - 0.9 * 450 / 900), 1000: 0.2})
  cfg = sched_cfg(warmup=0.0, lr_schedule="linear", decay=None, min_lr_ratio=0.0)
  check_schedule(cfg, 1.0, 10, {0: 1.0, 1: 0.9, 9: 0.1})  # decay=None, no warmup: decays from step 0
  cfg = sched_cfg(warmup=10, lr_schedule="constant", decay=None)
  check_schedule(cfg, 1.0, 100, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0})
  # Levanter clamps: warmup+decay > total leaves no stable phase; decay 0 with cosine means constant (no error).
  cfg = sched_cfg(warmup=0.5, lr_schedule="linear", decay=0.8, min_lr_ratio=0.0)
  check_schedule(cfg, 1.0, 100, {25: 0.5, 50: 1.0, 75: 0.5, 99: 0.02})
  cfg = sched_cfg(warmup=0.0, lr_schedule="cosine", decay=0.0)
  check_schedule(cfg, 1.0, 100, {0: 1.0, 99: 1.0})


def test_learning_rates_jittable_and_first_warmup_update_is_zero():
  cfg = muon_cfg(warmup=10, lr_schedule="linear", decay=None)
  lrs = jax.jit(lambda s: optim.learning_rates(optim.OptimizerConfig.from_config(cfg, 100), s))(jnp.int32(5))
  assert set(lrs) == {"learning_rate", "adam_lr"}, "muon logs learning_rate and adam_lr"
  assert abs(float(lrs["learning_rate"]) - 0.01) < 1e-8 and abs(float(lrs["adam_lr"]) - 0.002) < 1e-8, \
      "both groups follow the same warmup shape"
  u = run_steps(optim.make(cfg, 100), make_params(), [make_params(seed=1)])[0]
  assert all(np.all(v == 0) for v in u.values()), "with warmup the first update must have LR 0 (Levanter)"
  cfg.optimizer.name = "adamw"
  assert set(optim.learning_rates(optim.OptimizerConfig.from_config(cfg, 100), 0)) == {"learning_rate"}, "adamw logs only learning_rate"


# ---------------- 6: AdamW ----------------

def test_adamw_two_steps_match_numpy():
  cfg = config.base()
  o = cfg.optimizer
  o.name, o.learning_rate, o.weight_decay, o.nesterov = "adamw", 0.01, 0.1, False
  o.warmup, o.decay, o.lr_schedule, o.min_lr_ratio = 0.0, 1.0, "linear", 0.0
  o.beta1, o.beta2, o.epsilon, o.max_grad_norm = 0.9, 0.95, 1e-6, 1.0
  lrs = [0.01, 0.0075]
  params = make_params()
  grads = [make_params(seed=1, scale=0.1), make_params(seed=2, scale=0.1)]  # global norm ~ 3: clipped
  got = run_steps(optim.make(cfg, 4), params, grads, jit=True)
  p = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
  m, v = {k: 0.0 for k in p}, {k: 0.0 for k in p}
  for t, gt in enumerate(grads):
    g = {k: np.asarray(x, np.float64) for k, x in flat(gt).items()}
    gnorm = math.sqrt(sum(float(np.sum(x ** 2)) for x in g.values()))
    assert gnorm > 1.0, "test setup: the gradient should be clipped"
    for k in p:
      gk = g[k] / gnorm  # clip over ALL params
      m[k] = 0.9 * m[k] + 0.1 * gk
      v[k] = 0.95 * v[k] + 0.05 * gk * gk
      x = (m[k] / (1 - 0.9 ** (t + 1))) / (np.sqrt(v[k] / (1 - 0.95 ** (t + 1))) + 1e-6)
      if np_decayed(k):
        x = x + 0.1 * p[k]
      want = -lrs[t] * x
      err = rel_err(got[t][k], want)
      assert err < 1e-5, f"step {t} {k}: AdamW update differs from NumPy (rel err {err:.2e})"
      p[k] = p[k] + want


# ---------------- 7: sqrt batch-size rule ----------------

def test_sqrt_batch_rule_doubles_both_lrs():
  cfg = muon_cfg(lr_schedule="constant", decay=None, lr_scaling_base_batch=64)
  cfg.train.train_batch_size = 256
  lrs = optim.learning_rates(optim.OptimizerConfig.from_config(cfg, 100), 3)
  assert abs(float(lrs["learning_rate"]) - 0.04) < 1e-7, "Muon LR should be sqrt(256/64)=2x"
  assert abs(float(lrs["adam_lr"]) - 0.008) < 1e-8, "Adam LR should be sqrt(256/64)=2x"


# ---------------- 8: orthogonalisation sanity, sharding, errors ----------------

@pytest.mark.parametrize("coefficient_type,lo,hi", [("simple", 0.5, 1.3), ("quintic", 0.5, 1.3)])
def test_muon_update_has_singular_values_near_one(coefficient_type, lo, hi):
  cfg = muon_cfg(coefficient_type=coefficient_type, momentum=0.0, weight_decay=0.0, lr_schedule="constant",
                 decay=None, learning_rate=1.0)
  rng = np.random.default_rng(0)
  params = {"layers_0": {"mlp": {"up_proj": {"kernel": np.zeros((16, 40), np.float32)},
                                 "down_proj": {"kernel": np.zeros((40, 16), np.float32)}}},
            "norm": {"scale": np.zeros(16, np.float32)}}
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  u = run_steps(optim.make(cfg, 10), params, [grads])[0]
  for k, s in [("layers_0/mlp/up_proj/kernel", math.sqrt(40 / 16)), ("layers_0/mlp/down_proj/kernel", 1.0)]:
    sv = np.linalg.svd(-u[k] / s, compute_uv=False)
    assert lo <= sv.min() and sv.max() <= hi, \
        f"{k}: NS did not orthogonalise, singular values {sv.min():.3f}..{sv.max():.3f}"


def test_sharded_params_give_the_same_update():
  cfg = muon_cfg()
  params, grads = make_params(), make_params(seed=1, scale=0.1)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  def shard(x):
    spec = P("data") if x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  want = run_steps(optim.make(cfg, 4), params, [grads])[0]
  got = run_steps(optim.make(cfg, 4), jax.tree.map(shard, params), [jax.tree.map(shard, grads)], jit=True)[0]
  for k in want:
    assert rel_err(got[k], want[k]) < 1e-5, f"{k}: update changes when params/grads are NamedSharding-sharded"


def test_unknown_names_raise_config_error():
  cfg = config.base()
  cfg.optimizer.name = "sgd"
  with pytest.raises(config.ConfigError, match="optimizer.name"):
    optim.make(cfg, 10)
  cfg = config.base()
  cfg.optimizer.lr_schedule = "inv_sqrt"
  with pytest.raises(config.ConfigError, match="optimizer.lr_schedule"):
    optim.make(cfg, 10)
