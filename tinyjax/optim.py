"""The optimizer: Levanter's MuonConfig / AdamConfig (routing, weight-decay mask, LR schedule) as optax transforms.

Sources (read for this file): levanter src/levanter/optim/{muon.py,util.py,config.py} as vendored in
marin lib/levanter (MuonConfig.build/create_mask, scale_with_muon, zeropower_via_newtonschulz5,
OptimizerConfig.build_weight_decay_mask/lr_scheduler, AdamConfig.build), github.com/marin-community/marin.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from tinyjax import config

# Levanter util.NEWTON_SCHULZ_COEFFICIENTS; sets are used cyclically (step i uses set i % len).
NS_COEFFICIENTS = {
    "simple": ((3.4445, -4.7750, 2.0315),),
    "quintic": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
    "polar_express": ((8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
                      (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
                      (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750)),
    "aol": ((4.0098, -7.0585, 2.4635), (3.4585, -5.5479, 2.5959), (2.7573, -3.2939, 1.4254),
            (2.7215, -3.0494, 1.3169)),
}


def param_path(path) -> str:
  """A jax key path -> "layers_0/self_attn/q_proj/kernel"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def labels(params):
  """Levanter MuonConfig.create_mask: Muon for every Linear weight except lm_head; Adam for the rest."""
  def label(path, x):
    name = param_path(path)
    is_linear = name.endswith("kernel") and getattr(x, "ndim", 0) == 2
    return "muon" if is_linear and "lm_head" not in name else "adam"
  return jax.tree_util.tree_map_with_path(label, params)


def elementwise(params):
  """True for the parameters whose update is elementwise (every one but Muon's matrices)."""
  return jax.tree.map(lambda label: label != "muon", labels(params))


def elementwise_state(opt_state):
  """True for the optimizer-state leaves of elementwise updates: all but those under the Muon group's state."""
  def keep(path, _):
    return not any(getattr(k, "key", None) == "muon" for k in path)
  return jax.tree_util.tree_map_with_path(keep, opt_state)


def weight_decay_mask(params):
  """Levanter build_weight_decay_mask (weight_decay_modules=None): no decay for norms, the embedding and biases.

  Levanter matches class names ("RmsNorm", "Embedding"); Flax names the modules, so we match "norm"/"embed_tokens".
  Called on the full tree and, inside multi_transform, on trees whose other-group leaves are MaskedNode (no leaves).
  """
  def decay(path, _):
    name = param_path(path)
    return not ("norm" in name or "embed_tokens" in name or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(decay, params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """cfg.optimizer resolved for one run: peak LRs after the sqrt batch-size rule, schedule phases in steps."""
  name: str
  learning_rate: float
  adam_lr: float
  total_steps: int
  warmup_steps: int
  decay_steps: int
  lr_schedule: str
  min_lr_ratio: float
  beta1: float
  beta2: float
  epsilon: float
  nesterov: bool
  max_grad_norm: float
  weight_decay: float
  adam_weight_decay: float
  momentum: float
  backend_steps: int
  coefficient_type: str
  muon_epsilon: float
  use_kimi_scaling: bool

  @classmethod
  def from_config(cls, cfg, total_steps: int) -> "OptimizerConfig":
    o = cfg.optimizer
    if o.lr_schedule not in config.SCHEDULES:
      raise config.ConfigError(f"config.optimizer.lr_schedule={o.lr_schedule!r} is invalid: "
                               f"allowed: {', '.join(config.SCHEDULES)}")
    lr, adam_lr = config.learning_rates(cfg)
    same = ("name", "lr_schedule", "min_lr_ratio", "beta1", "beta2", "epsilon", "nesterov", "max_grad_norm",
            "weight_decay", "momentum", "backend_steps", "coefficient_type", "muon_epsilon", "use_kimi_scaling")
    return cls(learning_rate=lr, adam_lr=adam_lr, total_steps=total_steps,
               warmup_steps=config.warmup_steps(cfg, total_steps), decay_steps=config.decay_steps(cfg, total_steps),
               adam_weight_decay=o.weight_decay if o.adam_weight_decay is None else o.adam_weight_decay,
               **{k: o[k] for k in same})


def schedule(o: OptimizerConfig, peak: float) -> optax.Schedule:
  """Levanter OptimizerConfig.lr_scheduler (one cycle, no cooldown): warmup 0->peak, stable, decay to peak*min_ratio."""
  total = o.total_steps
  # Clamps as Levanter: warmup <= total; 0 <= decay <= total - warmup; the rest is the stable phase.
  warm = min(o.warmup_steps, total)
  decay = min(max(o.decay_steps, 0), max(total - warm, 0))
  stable = total - warm - decay
  pieces, boundaries = [], []
  if warm > 0:
    pieces.append(optax.linear_schedule(0.0, peak, warm))  # starts at 0: the first update has LR 0
    boundaries.append(warm)
  if stable > 0:
    pieces.append(optax.constant_schedule(peak))
    boundaries.append(warm + stable)
  if decay > 0 and o.lr_schedule == "cosine":
    pieces.append(optax.cosine_decay_schedule(peak, decay, alpha=o.min_lr_ratio))
  elif decay > 0 and o.lr_schedule == "linear":
    pieces.append(optax.linear_schedule(peak, peak * o.min_lr_ratio, decay))
  else:  # "constant", or no decay steps (Levanter then also uses a constant schedule)
    pieces.append(optax.constant_schedule(peak))
  return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)


def learning_rates(o: OptimizerConfig, step) -> dict:
  """Scheduled LRs at `step` (jittable), logged as Levanter's optim/learning_rate and optim/adam_lr."""
  out = {"learning_rate": schedule(o, o.learning_rate)(step)}
  if o.name == "muon":
    out["adam_lr"] = schedule(o, o.adam_lr)(step)
  return out


def newton_schulz(x: jax.Array, steps: int, coefficient_type: str, eps: float) -> jax.Array:
  """Levanter zeropower_via_newtonschulz5, line for line.

  Written out rather than optax.contrib.orthogonalize_via_newton_schulz: that helper computes the same iteration,
  but takes a per-step coefficient array (we would have to tile the cyclic sets) and wraps it in vmap/scan;
  this plain unrolled loop is the exact Levanter op order. Runs in the gradient dtype, default matmul precision.
  """
  if x.ndim != 2:
    raise ValueError(f"Muon orthogonalises 2-D kernels only, got shape {x.shape}")
  coeffs = NS_COEFFICIENTS[coefficient_type]
  x = x / (jnp.linalg.norm(x) + eps)  # Frobenius norm: top singular value <= 1
  transpose = x.shape[0] > x.shape[1]
  if transpose:  # iterate on the wide orientation (A = X Xᵀ is the small Gram matrix)
    x = x.T
  for i in range(steps):
    a, b, c = coeffs[i % len(coeffs)]
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if transpose else x


def scale_by_newton_schulz(steps: int, coefficient_type: str, eps: float) -> optax.GradientTransformation:
  """Orthogonalise every (2-D) leaf; stateless."""
  if coefficient_type not in NS_COEFFICIENTS:
    raise config.ConfigError(f"config.optimizer.coefficient_type={coefficient_type!r} is invalid: "
                             f"allowed: {', '.join(NS_COEFFICIENTS)}")

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: newton_schulz(u, int(steps), coefficient_type, eps), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_shape(use_kimi_scaling: bool = False) -> optax.GradientTransformation:
  """Levanter's per-matrix scale sqrt(max(1, out/in)) (or 0.2*sqrt(max(out, in)) Kimi-style).

  Levanter weights are (out, in) and it uses shape[0]/shape[1]; Flax kernels are (in, out): out/in = shape[1]/shape[0].
  """
  def factor(shape):
    fan_in, fan_out = shape
    return 0.2 * max(fan_out, fan_in) ** 0.5 if use_kimi_scaling else max(1.0, fan_out / fan_in) ** 0.5

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * jnp.asarray(factor(u.shape), u.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def _descend(sched) -> optax.GradientTransformation:
  # Levanter: inject_hyperparams(schedule) + optax.scale(-lr); the count is this transform's own update count,
  # so update k (0-based) uses sched(k), exactly like inject_hyperparams.
  return optax.scale_by_schedule(lambda count: -sched(count))


def _clip(max_grad_norm: float) -> list:
  return [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []  # Levanter: `if self.max_grad_norm`


def _decay(weight_decay: float) -> list:
  # Levanter only adds the transform when wd > 0 (identical to adding it with 0).
  return [optax.add_decayed_weights(weight_decay, weight_decay_mask)] if weight_decay > 0 else []


def make(cfg, total_steps: int) -> optax.GradientTransformation:
  """The full optimizer of a config, stepping its schedules over total_steps updates (the ConfigDict stops here)."""
  return build(OptimizerConfig.from_config(cfg, total_steps))


def build(o: OptimizerConfig, orthogonalise: bool = True) -> optax.GradientTransformation:
  """The full optimizer for o.name ("muon" | "adamw"). orthogonalise=False: Muon's Newton-Schulz step replaced by the
  identity (the same state): the elementwise twin the step's guard recomputes the elementwise updates with."""
  if o.name == "adamw":  # Levanter AdamConfig.build: clip over all params
    return optax.chain(*_clip(o.max_grad_norm),
                       optax.scale_by_adam(o.beta1, o.beta2, o.epsilon, nesterov=o.nesterov),
                       *_decay(o.weight_decay), _descend(schedule(o, o.learning_rate)))
  if o.name == "muon":  # Levanter MuonConfig.build
    muon = optax.chain(
        # scale_with_muon momentum: buf <- m*buf + g; u = m*buf + g (nesterov) else buf. optax.trace computes
        # exactly this (it is NOT optax.contrib.muon's bias-corrected EMA). Muon grads are never clipped.
        optax.trace(decay=o.momentum, nesterov=o.nesterov),
        scale_by_newton_schulz(o.backend_steps, o.coefficient_type, o.muon_epsilon) if orthogonalise
        else optax.identity(),
        scale_by_shape(o.use_kimi_scaling),
        *_decay(o.weight_decay),
        _descend(schedule(o, o.learning_rate)))
    adam = optax.chain(
        *_clip(o.max_grad_norm),  # inside multi_transform: the norm covers the Adam-group leaves only
        optax.scale_by_adam(o.beta1, o.beta2, o.epsilon),  # Levanter passes no nesterov here: plain Adam
        *_decay(o.adam_weight_decay),
        _descend(schedule(o, o.adam_lr)))
    return optax.multi_transform({"muon": muon, "adam": adam}, labels)
  raise config.ConfigError(f"config.optimizer.name={o.name!r} is invalid: allowed: {', '.join(config.OPTIMIZERS)}")
