"""The train step: its state, the jitted update (gradient accumulation, non-finite guard), the abstract inputs it is
compiled for, and the planner that compiles it at each gradient accumulation to find what fits a device.

`build(cfg, mesh, platform)` is the one place a config becomes a step: train.py runs it, plan.py, aot.py and
audit.py compile or trace it, the benchmarks time it. The ConfigDict stops here: the step itself takes StepSettings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import config, dynamics, flops, optim, sharding
from tinyjax.hardware import memory
from tinyjax.kernels import loss
from tinyjax.model import ModelConfig, Transformer, next_token_loss


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  bad_steps: jax.Array  # updates skipped because the loss or gradient norm was not finite
  first_bad_step: jax.Array  # step of the first non-finite update, -1 if none
  bad_what: jax.Array  # what was non-finite at first_bad_step: bits 1 loss, 2 grad_norm, 4 updated params


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int) -> TrainState:
  tokens_BL = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  params = model.init(jax.random.key(seed), tokens_BL)["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), bad_steps=zero, first_bad_step=zero - 1,
                    bad_what=zero)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the update needs from the config, as typed values."""
  z_loss_weight: float
  dynamics_rows: int  # rows of the batch the dynamics variant measures
  learning_rates: Callable  # step -> {"learning_rate", ["adam_lr"]}: the scheduled LRs, logged every step
  elementwise_tx: optax.GradientTransformation  # the optimizer without Muon's orthogonalisation (the guard's check)

  @classmethod
  def from_config(cls, cfg, opt: optim.OptimizerConfig) -> "StepSettings":
    return cls(cfg.train.z_loss_weight, cfg.train.dynamics_rows, lambda step: optim.learning_rates(opt, step),
               optim.build(opt, orthogonalise=False))


# Name scopes of the update's parts in compiled programs' op metadata (hardware/roofline.py attributes kernels by
# them): the optimizer's transform and apply, and the non-finite guard with its norms.
OPTIMIZER_SCOPE, GUARD_SCOPE = "optimizer", "guard"


def _sum_squares(tree) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in _floats(tree)), jnp.zeros((), jnp.float32))


def _nonfinite_probe(tree) -> jax.Array:
  """0.0 when every floating element of `tree` is finite, NaN otherwise: x * 0 is NaN exactly for inf and NaN, so
  one sum per array says it, and XLA folds these sums into the same reduction pass as the parameters' norm."""
  return sum((jnp.sum(x.astype(jnp.float32) * 0) for x in _floats(tree)), jnp.zeros((), jnp.float32))


def _barrier(tree, mask):
  """`tree` with the leaves where `mask` is True passed through one optimization_barrier: the same buffers, as values
  XLA cannot identify with the originals (so it cannot merge what is computed from them with what is computed from
  the originals)."""
  leaves, flags = jax.tree.leaves(tree), jax.tree.leaves(mask)
  barred = iter(jax.lax.optimization_barrier([x for x, m in zip(leaves, flags) if m]))
  return jax.tree.unflatten(jax.tree.structure(tree), [next(barred) if m else x for x, m in zip(leaves, flags)])


def _pick(mask, yes, no):
  return jax.tree.map(lambda m, a, b: a if m else b, mask, yes, no)


def _floats(tree) -> list:
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _grads_and_loss(model, settings: StepSettings, accum: int, micro_sharding):
  """(params, tokens[B, L]) -> (grads, mean NLL) over `accum` microbatches of B / accum rows."""
  grad_fn = jax.value_and_grad(
      lambda params, tokens_BL: next_token_loss(model, params, tokens_BL, settings.z_loss_weight), has_aux=True)

  def grads_and_loss(params, tokens_BL):
    if accum == 1:
      (_, loss), grads = grad_fn(params, tokens_BL)
      return grads, loss
    B, L = tokens_BL.shape
    # Microbatch a takes rows a, a+accum, ...: every device keeps its own rows (no resharding of the batch).
    tokens_ABL = jax.lax.with_sharding_constraint(
        tokens_BL.reshape(B // accum, accum, L).transpose(1, 0, 2), micro_sharding)

    def body(carry, micro_BL):
      (_, loss), grads = grad_fn(params, micro_BL)
      return jax.tree.map(jnp.add, carry, (grads, loss)), None
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), _ = jax.lax.scan(body, zeros, tokens_ABL)
    # Every microbatch has the same number of loss positions, so the mean of means is the full-batch mean.
    return jax.tree.map(lambda g: g / accum, grads), loss / accum
  return grads_and_loss


def make_train_step(model, tx, settings: StepSettings, state_shardings, batch_sharding, accum: int = 1,
                    with_dynamics: bool = False):
  """(state, tokens[B, L]) -> (state, metrics), jitted with explicit shardings and the state donated.

  A non-finite loss or gradient norm never reaches the state: the update is dropped (params and optimizer state
  keep their values) and counted; the host decides whether that stops the run (default) or is skipped (Marin's
  skip_bad_steps). So every state the loop can checkpoint is finite.
  with_dynamics: the same update, plus metrics["dynamics"] (dynamics.py): a separate function that the loop compiles
  ahead and calls only on dynamics steps, so ordinary steps pay nothing.
  """
  grads_and_loss = _grads_and_loss(model, settings, accum, NamedSharding(batch_sharding.mesh, P(None, sharding.DATA)))

  def step(state: TrainState, tokens_BL):
    grads, loss = grads_and_loss(state.params, tokens_BL)
    with jax.named_scope(GUARD_SCOPE):
      grad_norm = optax.tree.norm(grads)
    with jax.named_scope(OPTIMIZER_SCOPE):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      candidate = optax.apply_updates(state.params, updates)
    with jax.named_scope(GUARD_SCOPE):
      # An update can overflow with finite grads (e.g. a huge LR) and nothing non-finite may reach a checkpoint, so
      # the candidate state is checked before it replaces the old one, in two passes over the state: one reduction
      # pass, fused with its own copy of the elementwise updates (behind a barrier, so XLA cannot merge the copy
      # with the kept update and write the candidate out), then the selects that write the kept values in place.
      # Muon's matrices are checked from the kept update (their orthogonalisation is computed once).
      on_params, on_state = optim.elementwise(state.params), optim.elementwise_state(state.opt_state)
      g_, o_, p_ = _barrier((grads, state.opt_state, state.params), (on_params, on_state, on_params))
      u_, o2 = settings.elementwise_tx.update(g_, o_, p_)
      checked = _pick(on_params, optax.apply_updates(p_, u_), candidate)
      candidate_sq = _sum_squares(checked)
      state_ok = jnp.isfinite(candidate_sq + _nonfinite_probe(_pick(on_state, o2, opt_state)))
      what = jnp.where(jnp.isfinite(loss), 0, 1) + jnp.where(jnp.isfinite(grad_norm), 0, 2)
      what = what + jnp.where(state_ok | (what > 0), 0, 4)  # 4: only the update itself went non-finite
      bad = what > 0
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)
      first = bad & (state.first_bad_step < 0)
      new = TrainState(
          step=state.step + 1, params=keep(candidate, state.params),
          opt_state=keep(opt_state, state.opt_state), bad_steps=state.bad_steps + bad.astype(jnp.int32),
          first_bad_step=jnp.where(first, state.step + 1, state.first_bad_step),
          bad_what=jnp.where(first, what, state.bad_what))
      # The old parameters' norm is read only on a dropped step.
      param_norm = jax.lax.cond(bad, lambda: optax.tree.norm(state.params), lambda: jnp.sqrt(candidate_sq))
    out = {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
           "bad_steps": new.bad_steps, "first_bad_step": new.first_bad_step, "bad_what": new.bad_what,
           **settings.learning_rates(state.step)}
    if with_dynamics:
      out["dynamics"] = dynamics.collect(model, state.params, grads, updates, tokens_BL[:settings.dynamics_rows])
    return new, out

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                 donate_argnums=0)


def accum_candidates(per_device_batch: int, start: int = 1) -> list[int]:
  return [a for a in range(max(start, 1), per_device_batch + 1) if per_device_batch % a == 0]


class StepPlanner:
  """Compiles the train step at each gradient accumulation (cached) and finds the smallest that fits a device.

  make_step(accum) -> a jitted step; abstract_args are the (state, batch) ShapeDtypeStructs with shardings;
  configured is train.grad_accum_steps (0 = auto).
  """

  def __init__(self, make_step, abstract_args, per_device_batch: int, configured: int):
    self.make_step, self.abstract_args = make_step, abstract_args
    self.per_device_batch, self.configured = per_device_batch, configured
    self.executables, self.infos, self.errors = {}, {}, {}

  def info(self, accum: int) -> dict:
    """XLA's figures of the step at `accum`; a compiler that refuses it for lack of memory (libtpu) gives its own
    figure of what it would need, and its line in `errors`."""
    if accum not in self.infos:
      try:
        with jax.set_mesh(self.abstract_args[-1].sharding.mesh):  # Pallas kernels and the fused loss run per shard
          self.executables[accum] = self.make_step(accum).lower(*self.abstract_args).compile()
        self.infos[accum] = memory.analysis(self.executables[accum])
      except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a plan; the rest re-raised
        refused = memory.compiler_oom(e)
        if refused is None:
          raise
        self.infos[accum], self.errors[accum] = refused
    return self.infos[accum]

  def choose(self, total: float | None, platform: str) -> tuple[int, dict, dict]:
    """(accum, compiled info, fit) on a device of `total` bytes: the configured accumulation, or with 0 the
    smallest that fits."""
    if self.configured:
      info = self.info(self.configured)
      return self.configured, info, memory.fits(info["peak"], total, platform)
    return self.smallest_fitting(total, platform)

  def plan_for(self, total: float | None, platform: str, search: bool = True) -> tuple[int, int | None, dict, dict]:
    """(accum, auto, info, fit): the configured accumulation's figures on a device of `total` bytes, and the one
    grad_accum_steps=0 would pick (None without `search` where that takes more compiles; a smaller accumulation
    cannot fit where a larger one does not, so the search starts above a configured one that does not fit)."""
    accum, info, fit = self.choose(total, platform)
    auto = accum if not self.configured or (fit["fits"] and accum == 1) else None
    if auto is None and search:
      auto = self.smallest_fitting(total, platform, 1 if fit["fits"] else accum + 1)[0]
    return accum, auto, info, fit

  def smallest_fitting(self, total: float | None, platform: str, start: int = 1) -> tuple[int, dict, dict]:
    """What grad_accum_steps=0 picks among the accumulations >= start: the smallest that fits (else the largest)."""
    candidates = accum_candidates(self.per_device_batch, start) or [self.per_device_batch]
    for accum in candidates:
      info = self.info(accum)
      fit = memory.fits(info["peak"], total, platform)
      if fit["fits"] is not False or accum == candidates[-1]:
        return accum, info, fit
    raise AssertionError("unreachable")


def plan_figures(planner: StepPlanner, attention: str, total: float, platform: str, search: bool = True) -> dict:
  """What a plan for a device of `total` bytes reports, whichever compiler produced the figures: the configured
  accumulation's figures and fit, and the accumulation grad_accum_steps=0 would pick."""
  accum, auto, info, fit = planner.plan_for(total, platform, search)
  return {"accum": accum, "per_device_batch": planner.per_device_batch,
          "configured_grad_accum_steps": planner.configured, "grad_accum_steps": auto, "attention": attention,
          **{f"{k}_gib": v for k, v in memory.gib(info).items()}, **fit,
          **({"compiler_refused": planner.errors[accum]} if accum in planner.errors else {})}


@dataclasses.dataclass(frozen=True)
class Built:
  """A config's step on a mesh, ready to compile: the model, optimizer, state shapes and shardings."""
  model: Transformer
  tx: optax.GradientTransformation
  settings: StepSettings
  total_steps: int
  seed: int
  grad_accum_steps: int  # as configured (0 = auto)
  shapes: Any  # TrainState of ShapeDtypeStructs (jax.eval_shape: nothing allocated)
  state_sh: Any
  batch_sh: NamedSharding

  def init(self) -> TrainState:
    return jax.jit(lambda: init_state(self.model, self.tx, self.seed), out_shardings=self.state_sh)()

  def make(self, accum: int, with_dynamics: bool = False):
    return make_train_step(self.model, self.tx, self.settings, self.state_sh, self.batch_sh, accum, with_dynamics)

  def abstract_state(self):
    return sharding.abstract(self.shapes, self.state_sh)

  def abstract_inputs(self, batch: int):
    """(state, tokens) ShapeDtypeStructs carrying their shardings: what the step is lowered and compiled for."""
    tokens = jax.ShapeDtypeStruct((batch, self.model.cfg.seq_len), jnp.int32, sharding=self.batch_sh)
    return self.abstract_state(), tokens

  def planner(self, batch: int) -> StepPlanner:
    """The planner for `batch` global rows on this mesh."""
    per_device = batch // self.batch_sh.mesh.shape[sharding.DATA]
    return StepPlanner(self.make, self.abstract_inputs(batch), per_device, self.grad_accum_steps)


def build(cfg, mesh, platform: str | None = None, eos_id: int = 0, model_cfg: ModelConfig | None = None) -> Built:
  """cfg's step on `mesh`, traced as `platform` runs it (its attention kernel; default: the mesh's own). Token ids
  are irrelevant to memory and FLOPs, so planners leave EOS at id 0; the trainer passes the tokenizer's."""
  platform = platform or mesh.devices.flat[0].platform
  model_cfg = model_cfg or ModelConfig.from_config(cfg.model).for_platform(platform)
  _check_loss_kernel(model_cfg, platform)
  model = Transformer(model_cfg, eos_id=eos_id)
  total = config.num_train_steps(cfg, flops.param_counts(model_cfg)["model_size"])
  opt = optim.OptimizerConfig.from_config(cfg, total)
  tx = optim.build(opt)
  shapes = jax.eval_shape(lambda: init_state(model, tx, cfg.seed))
  return Built(model, tx, StepSettings.from_config(cfg, opt), total, cfg.seed, cfg.train.grad_accum_steps, shapes,
               sharding.state_shardings(shapes, mesh, cfg.mesh.fsdp), sharding.batch_sharding(mesh))


def _check_loss_kernel(model_cfg: ModelConfig, platform: str) -> None:
  """A Pallas loss kernel compiles only for its own platform (Mosaic: TPU, Triton: GPU), or anywhere interpreted."""
  backend = loss.PALLAS.get(model_cfg.loss_impl)
  gpu = platform in ("gpu", "cuda", "rocm")
  if backend and not model_cfg.kernel_interpret and backend != ("gpu" if gpu else platform):
    raise config.ConfigError(
        f"config.model.loss_impl={model_cfg.loss_impl!r} compiles for a {backend.upper()} and this step is for "
        f"{platform}: use auto or fused, or model.kernel_interpret=true (the kernel interpreted, slowly)")


def plan_for_device(built: Built, cfg, batch: int):
  """(device, planner, accumulation, figures, fit) of `batch` rows on the first device of the built step's mesh, at
  the accumulation grad_accum_steps asks for (0: the smallest that fits the device's memory)."""
  device = built.batch_sh.mesh.devices.flat[0]
  planner = built.planner(batch)
  accum, info, fit = planner.choose(memory.device_memory(device.device_kind, cfg.train.device_memory_gb),
                                    device.platform)
  return device, planner, accum, info, fit


def compile_for_device(built: Built, cfg) -> tuple[Any, dict]:
  """(train step, memory plan) on this mesh's devices: the step compiled ahead (shapes only, under the mesh, so the
  Pallas kernels and the fused loss run per shard) and XLA's figures; with train.memory_check a step that cannot
  fit the device is a ConfigError before anything is allocated. grad_accum_steps=0 picks the smallest that fits."""
  device, planner, accum, info, fit = plan_for_device(built, cfg, cfg.train.train_batch_size)
  if cfg.train.memory_check and fit["fits"] is False:
    memory.refuse(cfg, info["peak"], fit, device.device_kind, accum)
  return planner.executables[accum], {"checked": cfg.train.memory_check, "grad_accum_steps": accum,
                                      "compiled_gib": memory.gib(info), "attention": built.model.cfg.attention, **fit}
