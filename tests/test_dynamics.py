"""Training dynamics, TensorBoard mirrors: values equal independent computations, ordinary steps never run the
dynamics variant, and a resumed run's dynamics.jsonl equals an uninterrupted one's."""
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyjax import config, dynamics, env, train
from tinyjax.model import ModelConfig, Transformer
from tinyjax.runtime import metrics


def _model(qk_norm: bool):
  cfg = config.base()
  m = cfg.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 16, 32, 2, 4, 2
  m.seq_len, m.vocab_size, m.compute_dtype, m.use_qk_norm = 8, 50, "float32", qk_norm
  return Transformer(ModelConfig.from_config(m), eos_id=1)


# A hand-built batch: two documents in row 0 (EOS = 1 at position 3), one in row 1.
TOKENS = jnp.array([[5, 9, 12, 1, 7, 7, 30, 2], [40, 3, 3, 8, 21, 6, 11, 49]], jnp.int32)


def _rms_norm(x, scale, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x_LNK):
  L, _, K = x_LNK.shape
  inv = 1.0 / 10000.0 ** (np.arange(0, K, 2) / K)
  f = np.concatenate([np.arange(L)[:, None] * inv] * 2, -1)[:, None, :]
  x1, x2 = np.split(x_LNK, 2, -1)
  return x_LNK * np.cos(f) + np.concatenate([-x2, x1], -1) * np.sin(f)


def _layer0_attention_logits(params, tokens_L, qk_norm):
  """NumPy, from the parameters: layer 0's pre-softmax logits [H, L, L] and the allowed-pair mask."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  a = p["layers_0"]["self_attn"]
  x = _rms_norm(p["embed_tokens"]["embedding"][tokens_L], p["layers_0"]["input_layernorm"]["scale"])
  L, H, G, K = len(tokens_L), 4, 2, 4
  q, k = (x @ a["q_proj"]["kernel"]).reshape(L, H, K), (x @ a["k_proj"]["kernel"]).reshape(L, G, K)
  if qk_norm:
    q, k = _rms_norm(q, a["q_norm"]["scale"]), _rms_norm(k, a["k_norm"]["scale"])
  q, k = _rope(q), _rope(k)
  k_H = np.repeat(k, H // G, axis=1)  # query head h uses kv head h // R
  s = np.einsum("lhk,mhk->hlm", q, k_H) / math.sqrt(K)
  seg = np.cumsum(np.concatenate([[0], np.asarray(tokens_L[:-1]) == 1]))
  mask = (np.arange(L)[:, None] >= np.arange(L)[None]) & (seg[:, None] == seg[None])
  return s, mask


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", [False, True])
def test_forward_statistics_equal_an_independent_computation(qk_norm):
  model = _model(qk_norm)
  params = model.init(jax.random.key(0), TOKENS)["params"]
  if qk_norm:  # non-trivial norm scales, so that the test sees whether they are applied
    params["layers_0"]["self_attn"]["q_norm"]["scale"] = jnp.linspace(0.5, 2.0, 4)
  stats = jax.device_get(dynamics.forward_stats(model, params, TOKENS[:1]))
  s, mask = _layer0_attention_logits(params, np.asarray(TOKENS[0]), qk_norm)
  for h in range(4):
    allowed = s[h][mask]
    assert stats[f"attention/layers_0/head_{h}/logit_max"] == pytest.approx(allowed.max(), rel=1e-5)
    assert stats[f"attention/layers_0/head_{h}/logit_rms"] == pytest.approx(np.sqrt(np.mean(allowed ** 2)), rel=1e-5)
  probs = np.where(mask, np.exp(s - np.where(mask, s, -np.inf).max(-1, keepdims=True)), 0)
  probs /= probs.sum(-1, keepdims=True)
  entropy = -np.sum(np.where(mask, probs * np.log(np.where(mask, probs, 1)), 0), -1).mean()
  assert stats["attention/layers_0/entropy"] == pytest.approx(entropy, rel=1e-5)
  logits = np.asarray(model.apply({"params": params}, TOKENS[:1]), np.float64)
  logz = np.log(np.exp(logits).sum(-1))
  assert stats["logits/logz_max"] == pytest.approx(logz.max(), rel=1e-6)
  assert stats["logits/logz_mean"] == pytest.approx(logz.mean(), rel=1e-6)
  assert stats["logits/max"] == pytest.approx(logits.max(), rel=1e-6)
  assert stats["logits/rms"] == pytest.approx(np.sqrt(np.mean(logits ** 2)), rel=1e-5)


def test_tree_statistics_and_update_ratio():
  params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.array([[3.0, -4.0]])}}},
            "norm": {"scale": jnp.array([1.0, 1.0, 1.0, 1.0])}}
  updates = jax.tree.map(lambda x: 0.1 * x, params)
  stats = jax.device_get({**dynamics.tree_stats(params, "params"), **dynamics.tree_stats(updates, "updates")})
  assert stats["params/layers_0/mlp/up_proj/kernel/norm"] == pytest.approx(5.0)
  assert stats["params/layers_0/mlp/up_proj/kernel/mean"] == pytest.approx(-0.5)
  assert stats["params/layers_0/mlp/up_proj/kernel/max_abs"] == pytest.approx(4.0)
  assert stats["params/layers_0/mlp/up_proj/kernel/rms"] == pytest.approx(5.0 / math.sqrt(2))
  assert stats["params/group/up_proj/norm"] == pytest.approx(5.0)
  assert stats["params/total/norm"] == pytest.approx(math.sqrt(25 + 4))
  ratios = dynamics.update_ratios(stats)
  assert ratios["update_ratio/layers_0/mlp/up_proj/kernel"] == pytest.approx(0.1)
  assert ratios["update_ratio/group/norm"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def dynamics_cfg(small_cfg):
  return lambda: small_cfg(**{"train.dynamics_every": 2})


@pytest.fixture(scope="module")
def finished(dynamics_cfg, tmp_path_factory):
  """An 8-step run with dynamics every 2 steps, and the steps at which the dynamics variant ran."""
  workdir = tmp_path_factory.mktemp("full")
  pushed, traced = [], []
  push, collect = dynamics.Log.push, dynamics.collect
  dynamics.Log.push = lambda self, step, values: (pushed.append(step), push(self, step, values))[1]
  dynamics.collect = lambda *a: (traced.append(1), collect(*a))[1]
  try:
    train.run(dynamics_cfg(), str(workdir), env.record())
  finally:
    dynamics.Log.push, dynamics.collect = push, collect
  return workdir, pushed, traced


@pytest.mark.slow
def test_dynamics_variant_runs_only_on_dynamics_steps(finished):
  workdir, pushed, traced = finished
  assert pushed == [2, 4, 6, 8], "ordinary steps must never run the dynamics variant"
  assert traced == [1], "the dynamics variant is traced and compiled once"
  rows = dynamics.read(str(workdir))
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert all(np.isfinite(v) for r in rows for v in r.values())
  assert {"attention/layers_1/head_1/logit_max", "update_ratio/group/q_proj", "logits/logz_max",
          "grads/total/norm", "activations/layers_0/rms"} <= rows[0].keys()


@pytest.mark.slow
def test_resumed_dynamics_equal_uninterrupted(finished, dynamics_cfg, tmp_path):
  """A run killed after step 8's dynamics row but before its final checkpoint: rerun resumes at step 4 and
  rewrites rows 6 and 8 once, with the same values (bitwise on CPU)."""
  full, _, _ = finished
  workdir = tmp_path / "w"
  shutil.copytree(full, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  with open(workdir / "dynamics.jsonl", "a") as f:
    f.write('{"step": 8, "torn')  # a kill mid-write
  train.run(dynamics_cfg(), str(workdir), env.record())
  assert dynamics.read(str(workdir)) == dynamics.read(str(full))
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
  acc.Reload()  # the first run's file holds steps 1-8; the resumed run's purge at step 5 drops its 5-8
  assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9))


@pytest.mark.slow
def test_tensorboard_holds_the_metrics(finished):
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  workdir, _, _ = finished
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
  acc.Reload()
  loss = {e.step: e.value for e in acc.Scalars("loss")}
  expected = {r["step"]: r["loss"] for r in metrics.read(str(workdir)) if "loss" in r}
  assert loss.keys() == expected.keys() and all(loss[s] == pytest.approx(expected[s], rel=1e-6) for s in loss)
  bpb = {e.step: e.value for e in acc.Scalars("eval/python_docs/bpb")}
  assert sorted(bpb) == [4, 8]
  dyn = {e.step: e.value for e in acc.Scalars("attention/layers_0/entropy")}
  assert dyn == pytest.approx({r["step"]: r["attention/layers_0/entropy"] for r in dynamics.read(str(workdir))})


def test_wandb_offline(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb", reason="pip install -e '.[test]' installs wandb")
  from tinyjax.runtime import tracking  # noqa: PLC0415
  monkeypatch.setenv("WANDB_MODE", "offline")
  cfg = config.base()
  cfg.train.wandb_project, cfg.train.tensorboard = "tinyjax-test", False
  tracker = tracking.Tracker(str(tmp_path), cfg, 0)
  tracker.write(1, {"loss": 2.5, "event": "x"})
  tracker.close()
  assert wandb.run is None and any((tmp_path / "wandb").glob("offline-run-*"))


def test_a_tensorboard_write_error_reaches_the_loop_instead_of_hanging_it(tmp_path, monkeypatch):
  """Before: tensorboardX's writer thread died on ENOSPC (a disk filling during a save) and the training loop then
  blocked for good on the writer's full queue, deaf to SIGTERM. The error now reaches the loop (main: a full disk is
  one line, exit 2), and closing the broken writer neither raises nor blocks."""
  import errno  # noqa: PLC0415
  import os  # noqa: PLC0415
  import threading  # noqa: PLC0415

  from tensorboardX import record_writer  # noqa: PLC0415

  from tinyjax.runtime import tracking  # noqa: PLC0415
  cfg = config.base()
  tracker = tracking.Tracker(str(tmp_path), cfg, 0)

  def full(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(record_writer.RecordWriter, "write", full)
  outcome = []

  def loop():
    try:
      for step in range(1, 50):
        tracker.write(step, {"loss": 1.0, "grad_norm": 2.0, "learning_rate": 0.01})
    except OSError as e:
      outcome.append(e.errno)
    tracker.close()
    outcome.append("closed")
  thread = threading.Thread(target=loop, daemon=True)
  thread.start()
  thread.join(60)  # ms when it works; before, forever
  assert outcome == [errno.ENOSPC, "closed"]
