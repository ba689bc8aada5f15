"""Run this first on a GPU or TPU: the train step's speed beside its roofline, its memory beside the compiler's plan,
and the loss and attention kernels checked against their references on that device.

python -m tinyjax.benchmarks.device [--config=configs/c4_50m.py] [--config.KEY=VALUE ...] [--steps=20] [--warmup=3]
    [--out=device.json]

The config's real train step (step.build, compiled ahead by step.compile_for_device) on every local device of one
host (the config's mesh), fed synthetic tokens: uniform ids from a fixed seed in the config's [batch, seq_len], so no
data and no network. --warmup steps, then --steps steps dispatched back to back and timed as one span. One JSON
(--out) and one printed table: tokens/s and MFU beside the roofline's bound (hardware/roofline.py on the compiled
module, data-sheet peaks), peak memory in use beside the compiled plan's peak, each kernel's max relative error
against its reference (fp32, forward and gradients), versions and the flags in force. c4_50m on one H100, expected
(not yet measured here): 1-2 minutes, i.e. a compile under a minute, 23 steps of ~0.15 s (Marin's 1xH200 run:
1,179 s / 7,629 steps) and the checks; on this 2-core CPU tiny.py takes ~20 s.
Without an accelerator it says so in one line (and in the JSON's "note") and runs on the CPU: the --config given,
or configs/tiny.py.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tinyjax import cli, config, env, flops, sharding, step
from tinyjax.hardware import targets
from tinyjax.kernels import attention, loss

ACCELERATOR_CONFIG, CPU_CONFIG = "configs/c4_50m.py", "configs/tiny.py"
SEED = 0
GIB = 2 ** 30
# The checks trace kernel and reference at matmul precision "highest", so that fp32 means fp32 on every device:
# by default Triton takes TF32 for fp32 dots (Pallas GPU) and XLA:TPU one bf16 pass; that rounding (~1e-3) would
# hide a kernel's real error. In fp32 a correct kernel differs only by summation order: ~1e-6 relative.
CHECK_PRECISION, TOLERANCE = "highest", 1e-5
PACKAGES = ("jax", "jaxlib", "flax", "optax", "ml-collections", "libtpu", "libtpu-nightly", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, --config.KEY=VALUE overrides); a mistake is one line and exit 2."""
  parser = cli.ArgParser(prog="python -m tinyjax.benchmarks.device", description=cli.summary(__doc__),
                         allow_abbrev=False)
  parser.add_argument("--config", default=None,
                      help=f"config file (default: {ACCELERATOR_CONFIG} on an accelerator, {CPU_CONFIG} on a CPU)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocation, autotuning)")
  parser.add_argument("--out", default="device.json", help="the JSON written")
  args, rest = parser.parse_known_args(argv)
  if bad := [a for a in rest if not a.startswith("--config.")]:
    cli.fail(f"unexpected argument {bad[0]!r}: flags are --config=..., --config.KEY=VALUE, --steps, --warmup, --out")
  if args.steps < 1 or args.warmup < 1:
    cli.fail(f"--steps={args.steps} --warmup={args.warmup}: both must be >= 1")
  return args, rest


def start(args, overrides: list[str]) -> tuple:
  """(cfg, its path, env record, note): config.env applied and the backend started before any device query, then
  the config chosen by what started; the note (None on an accelerator) says why this is a CPU run."""
  path = args.config or ACCELERATOR_CONFIG
  cfg = cli.load_config([f"--config={path}", *overrides])
  record = env.apply(cfg.env)
  record["backend"] = env.start_backend(cfg.env)
  if record["backend"] != "cpu":
    return cfg, path, record, None
  if args.config is None:
    applied, path = cfg.env.to_dict(), CPU_CONFIG
    cfg = cli.load_config([f"--config={path}", *overrides])
    if cfg.env.to_dict() != applied:  # the shipped configs share base()'s env; an edited one would not be in force
      raise config.ConfigError(f"{path}'s config.env differs from {ACCELERATOR_CONFIG}'s, which was applied "
                               f"before the backend started: pass --config={path} to run it with its own")
  asked = "as asked" if args.config else "instead of " + ACCELERATOR_CONFIG
  note = (f"no accelerator (JAX backend: cpu): {path} ran on the CPU {asked}; its figures are this CPU's, not a "
          "GPU's or TPU's")
  return cfg, path, record, note


def synthetic_tokens(cfg, batch_sharding) -> jax.Array:
  """Uniform token ids from a fixed seed in the config's [batch, seq_len], placed as the step expects them."""
  rng = np.random.default_rng(SEED)
  tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.train_batch_size, cfg.model.seq_len), dtype=np.int32)
  return jax.device_put(tokens, batch_sharding)


def time_steps(train_step, state, tokens, warmup: int, steps: int) -> dict:
  """Seconds of the first step, and per step over `steps` dispatched back to back after `warmup` (the host waits
  once, at the end: the dispatch queue never stalls), with the loss at the first and last step."""
  start = time.perf_counter()
  state, first = train_step(state, tokens)
  jax.block_until_ready(first)
  first_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    state, out = train_step(state, tokens)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = train_step(state, tokens)
  jax.block_until_ready((state, out))
  seconds = (time.perf_counter() - start) / steps
  first, last = jax.device_get((first, out))
  return {"step_time_s": seconds, "first_step_s": first_s, "loss_first": float(first["loss"]),
          "loss_last": float(last["loss"]), "bad_steps": int(last["bad_steps"])}


def memory_in_use(devices) -> dict:
  """The runtime's peak bytes in use (the largest over the devices), or null and why."""
  stats = [d.memory_stats() for d in devices]
  if any(s is None or "peak_bytes_in_use" not in s for s in stats):
    return {"peak_gib": None, "why": f"{devices[0].platform}: device.memory_stats() reports no peak_bytes_in_use "
                                     "(XLA's CPU client keeps no allocator statistics)"}
  limit = min(s.get("bytes_limit", 0) for s in stats)
  return {"peak_gib": round(max(s["peak_bytes_in_use"] for s in stats) / GIB, 3),
          "bytes_limit_gib": round(limit / GIB, 3) if limit else None}


def speed(compiled, built, cfg, seconds: float, devices) -> dict:
  """Tokens/s and MFU of the measured step, beside the roofline of its compiled module on this chip."""
  device, model_cfg, batch = devices[0], built.model.cfg, cfg.train.train_batch_size
  r = targets.local_roofline(compiled.as_text(), model_cfg, batch, len(devices), device, top=5)
  peak, peak_source = flops.peak_flops(device.device_kind), "tinyjax.flops.PEAK_FLOPS (Marin's table)"
  if peak is None:
    peak, peak_source = r["peak_flops"], r["chip_source"]
  tokens = batch * model_cfg.seq_len
  credited = flops.model_flops(model_cfg, tokens)
  return {"tokens_per_s": tokens / seconds, "mfu": credited / seconds / (peak * len(devices)),
          "model_flops_per_step": credited, "peak_flops_per_device": peak, "peak_source": peak_source,
          "roofline": {"bound_s": r["bound_s"], "tokens_per_s_bound": r["tokens_per_s_bound"],
                       "mfu_ceiling": r["mfu_ceiling"], "hbm_bytes": r["hbm_bytes"], "flops": r["flops"],
                       "chip": {"peak_flops": r["peak_flops"], "hbm_bandwidth": r["hbm_bandwidth"],
                                "source": r["chip_source"]},
                       "by_part": {k: v["share"] for k, v in r["by_part"].items()}, "top": r["top"]}}


def measure(cfg, warmup: int, steps: int) -> tuple[dict, object]:
  """The timed run of cfg's step on this host's devices: (figures, the model config the step traced)."""
  mesh = sharding.make_mesh(cfg.mesh)
  config.validate(cfg, num_devices=mesh.devices.size)
  built = step.build(cfg, mesh)
  start = time.perf_counter()
  train_step, plan = step.compile_for_device(built, cfg)
  compile_s = time.perf_counter() - start
  timing = time_steps(train_step, built.init(), synthetic_tokens(cfg, built.batch_sh), warmup, steps)
  devices = list(mesh.devices.flat)
  m = built.model.cfg
  shape = {"batch": cfg.train.train_batch_size, "seq_len": m.seq_len, "hidden_dim": m.hidden_dim,
           "num_layers": m.num_layers, "vocab_size": m.vocab_size, "grad_accum_steps": plan["grad_accum_steps"],
           "attention": m.attention, "loss_impl": m.loss_impl, "compute_dtype": m.compute_dtype}
  memory = {"in_use": memory_in_use(devices), "plan_gib": plan["compiled_gib"], "usable_gib": plan["usable_gib"],
            "fits": plan["fits"]}
  out = {"device_kind": devices[0].device_kind, "devices": len(devices), "shape": shape, "warmup": warmup,
         "steps": steps, "compile_s": compile_s, **timing, "memory": memory}
  return {**out, **speed(train_step, built, cfg, timing["step_time_s"], devices)}, m


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), np.finfo(np.float32).tiny))


def attention_check(impl: str, B: int, L: int, G: int, R: int, K: int, block: int) -> dict:
  """`impl`'s output and gradients (of sum(sin(out)) in q, k, v) against the reference einsum, fp32, on a random
  problem with several documents per row (EOS about every 20 tokens)."""
  ks = jax.random.split(jax.random.key(SEED), 4)
  q = jax.random.normal(ks[0], (B, L, G, R, K))
  k, v = jax.random.normal(ks[1], (B, L, G, K)), jax.random.normal(ks[2], (B, L, G, K))
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.05, (B, L)), axis=1).astype(jnp.int32)

  def out_and_grads(which):
    fn = lambda q, k, v: attention.attend(q, k, v, seg, which, block)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))
    return jax.jit(lambda *a: (fn(*a), *grads(*a)))(q, k, v)
  with jax.default_matmul_precision(CHECK_PRECISION):
    got, want = out_and_grads(impl), out_and_grads("reference")
  errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
  return {"impl": impl, "shape_BLGRK": [B, L, G, R, K], "errors": errors}


def loss_check(impl: str, D: int, V: int, tokens: int = 640, block: int = 256, z: float = 1e-2) -> dict:
  """`impl`'s loss (Σ w·(nll + z·logz²)) and gradients in x and the lm_head against autodiff of the unblocked
  reference_stats, fp32; 640 tokens in blocks of 256 (a padded last block), the last position of each row masked."""
  ks = jax.random.split(jax.random.key(SEED + 1), 3)
  x = jax.random.normal(ks[0], (2, tokens // 2, D))
  head = jax.random.normal(ks[1], (D, V)) / D ** 0.5  # unit-scale logits
  t = jax.random.randint(ks[2], (2, tokens // 2), 0, V)
  mask = jnp.ones((2, tokens // 2)).at[:, -1].set(0.0)
  w = mask / mask.sum()
  total = lambda s: jnp.sum(w * (s["nll"] + z * s["logz"] ** 2))
  kernels = {**{k: functools.partial(lambda x, h, k: loss.fused_loss(x, h, t, w, z, block, "float32", k)[0], k=k)
                for k in ("fused", *loss.PALLAS)},
             "blockwise": lambda x, h: total(loss.token_stats(x, h, t, block)),
             "reference": lambda x, h: total(loss.reference_stats(x, h, t))}
  run = lambda which: jax.jit(jax.value_and_grad(kernels[which], argnums=(0, 1)))(x, head)
  with jax.default_matmul_precision(CHECK_PRECISION):
    (got, got_g), (want, want_g) = run(impl), run("reference")
  errors = {"loss": rel_err(got, want), "dx": rel_err(got_g[0], want_g[0]), "dhead": rel_err(got_g[1], want_g[1])}
  return {"impl": impl, "shape_NDV": [tokens, D, V], "block": block, "errors": errors}


def _checked(fn, *args, **kwargs) -> dict:
  """A check's figures with their max and verdict; a check that fails on this device is reported, not raised: the
  timing already measured stays."""
  try:
    out = fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - a kernel that breaks here is a finding of this benchmark
    return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
  worst = max(out["errors"].values())
  return {**out, "max": worst, "tolerance": TOLERANCE, "ok": bool(worst <= TOLERANCE)}


def kernel_checks(m) -> dict:
  """The kernels the step uses on this device (model m, attention resolved for it) against their references, at
  m's head shape and up to 1,024 tokens; where the step uses the reference attention itself (short windows on a
  CPU), the blockwise kernel in at least two key blocks instead."""
  impl = m.attention if m.attention != "reference" else "blockwise"
  L = min(m.seq_len, 1024)
  groups, per_group = m.num_kv_heads, m.num_heads // m.num_kv_heads
  attn = _checked(attention_check, impl, 2, L, groups, per_group, m.head_dim, min(m.attention_block, L // 2))
  loss_impl = m.loss_kernel() if m.loss_block_size else "reference"  # loss_block_size 0: the step is the reference
  checks = {"attention": {**attn, "step_uses": m.attention},
            "loss": {**_checked(loss_check, loss_impl, m.hidden_dim, m.vocab_size), "step_uses": loss_impl}}
  return {"precision": CHECK_PRECISION, **checks}


def versions(device) -> dict:
  """Installed versions of what the step runs on, and the backend's own (CUDA driver / libtpu build)."""
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  out["platform_version"] = device.client.platform_version
  return out


def _n(x: float | None, unit: str = "") -> str:
  """1234567 -> '1.23M' (None -> 'n/a')."""
  if x is None:
    return "n/a"
  for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{' ' if unit else ''}{suffix}{unit}"
  return f"{x:.3g}{' ' if unit else ''}{unit}"


def _check_line(name: str, c: dict) -> str:
  if "error" in c:
    return f"{name:<11} {c['step_uses']}: FAILED on this device: {c['error']}"
  errs = "  ".join(f"{k} {v:.1e}" for k, v in c["errors"].items())
  verdict = "ok" if c["ok"] else "OVER"
  return (f"{name:<11} {c['impl']} vs reference, fp32 (the step uses {c['step_uses']}): {errs}  max {c['max']:.1e} "
          f"{verdict} (<= {c['tolerance']:.0e})")


def _row(label: str, measured: str, beside: str = "", ratio: str = "") -> str:
  return f"{label:<12}{measured:<18}{beside:<26}{ratio}".rstrip()


def table(r: dict) -> str:
  """The report as a console table: measured, beside the bound or the plan (the CPU note is printed at the start)."""
  s, roof, mem = r["shape"], r["roofline"], r["memory"]
  in_use, plan_peak = mem["in_use"]["peak_gib"], mem["plan_gib"]["peak"]
  ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else ""
  return "\n".join([
      f"device      {r['device_kind']} x {r['devices']} ({r['device']}), {r['config']}: batch {s['batch']} x "
      f"{s['seq_len']} tokens, grad accum {s['grad_accum_steps']}, {s['attention']} attention, {s['loss_impl']} "
      f"loss; {r['steps']} steps after {r['warmup']}",
      _row("", "measured", "bound / plan", "measured / bound"),
      _row("step time", f"{r['step_time_s'] * 1e3:.2f} ms", f"{roof['bound_s'] * 1e3:.2f} ms roofline",
           ratio(r["step_time_s"], roof["bound_s"])),
      _row("tokens/s", _n(r["tokens_per_s"]), f"{_n(roof['tokens_per_s_bound'])} roofline",
           ratio(r["tokens_per_s"], roof["tokens_per_s_bound"])),
      _row("MFU", f"{r['mfu']:.1%}", f"{roof['mfu_ceiling'] or 0:.1%} ceiling",
           f"peak {_n(r['peak_flops_per_device'], 'FLOP/s')}: {r['peak_source']}"),
      _row("peak memory", f"{in_use:.2f} GiB" if in_use is not None else "n/a", f"{plan_peak:.2f} GiB compiled plan",
           ratio(in_use, plan_peak) or mem["in_use"].get("why", "")),
      _row("compile", f"{r['compile_s']:.1f} s", f"first step {r['first_step_s']:.2f} s"),
      _row("loss", f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}", f"{r['bad_steps']} bad steps (one batch, repeated)"),
      _check_line("attention", r["kernels"]["attention"]), _check_line("loss kernel", r["kernels"]["loss"]),
      "versions    " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
      env.summary(r["env"])])


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  try:
    cfg, path, record, note = start(args, overrides)
    if note:
      print(f"device: {note}", flush=True)
    report = {"device": record["backend"], **({"note": note} if note else {}), "config": path,
              "config_overrides": overrides, "tokens": f"synthetic: uniform ids, numpy seed {SEED}"}
    figures, model_cfg = measure(cfg, args.warmup, args.steps)
    report.update(figures, kernels=kernel_checks(model_cfg), versions=versions(jax.devices()[0]), env=record)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  except Exception as e:  # noqa: BLE001 - a user mistake (ConfigError) is one line and exit 2; a bug re-raised
    cli.stop(e, args.out)
    raise
  print(table(report))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
