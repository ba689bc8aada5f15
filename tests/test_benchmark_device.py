"""tinyjax.benchmarks.device: its flags, the kernel checks and the memory figures on this CPU (fast), and the command
itself on a machine without an accelerator (slow): one printed note, tiny.py by default, the JSON's fields."""
import json
import math
import types

import pytest

from tinyjax.benchmarks import device
from tinyjax.model import ModelConfig

# GQA (2 query heads per kv head), two key blocks of 32 for the blockwise check, a vocabulary of 300: compiles fast.
SMALL = ModelConfig(hidden_dim=32, intermediate_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, seq_len=64,
                    vocab_size=300, attention="reference")


@pytest.mark.parametrize("argv,expected", [(["--steps=0"], "--steps=0"), (["--warmup=0"], "must be >= 1"),
                                           (["--bogus"], "unexpected argument '--bogus'"),
                                           (["--steps=x"], "invalid int value")])
def test_bad_flags_are_one_line(argv, expected, capsys):
  with pytest.raises(SystemExit) as e:
    device.parse(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("tinyjax: error: ") and expected in err


def test_config_overrides_pass_through():
  args, overrides = device.parse(["--config=configs/tiny.py", "--config.train.train_batch_size=8", "--steps=2"])
  assert (args.config, args.steps, args.warmup) == ("configs/tiny.py", 2, 3)
  assert overrides == ["--config.train.train_batch_size=8"]


def test_unknown_config_key_stops_before_the_backend(capsys):
  """A typo in an override is the config loader's one line, before config.env is applied."""
  args, overrides = device.parse(["--config.train.bogus=1"])
  with pytest.raises(SystemExit) as e:
    device.start(args, overrides)
  assert e.value.code == 2 and "train.bogus" in capsys.readouterr().err


def test_kernel_checks_agree_with_the_references_in_fp32():
  """Where the step uses the reference attention (short windows on a CPU) the blockwise kernel is checked in two key
  blocks instead; the fused loss in 3 blocks of 256 of 640 tokens. fp32: within 1e-5 of the largest value."""
  checks = device.kernel_checks(SMALL)
  attn, loss = checks["attention"], checks["loss"]
  assert (attn["impl"], attn["step_uses"], attn["shape_BLGRK"]) == ("blockwise", "reference", [2, 64, 2, 2, 8])
  assert (loss["impl"], loss["shape_NDV"]) == ("fused", [640, 32, 300])
  for c in (attn, loss):
    assert c["ok"] and c["max"] < 1e-5 and c["max"] == max(c["errors"].values()), c


def test_a_kernel_that_fails_is_reported_not_raised():
  """The Pallas GPU kernel cannot run on a CPU: its check says so, and the measured figures would stay."""
  checks = device.kernel_checks(ModelConfig(**{**SMALL.__dict__, "attention": "pallas_gpu"}))
  assert "error" in checks["attention"] and checks["attention"]["step_uses"] == "pallas_gpu"
  assert checks["loss"]["ok"]


def test_memory_in_use_or_why_not():
  gpu = lambda peak: types.SimpleNamespace(platform="gpu", memory_stats=lambda: {
      "peak_bytes_in_use": peak, "bytes_limit": 60 * 2 ** 30})
  assert device.memory_in_use([gpu(2 ** 30), gpu(3 * 2 ** 30)]) == {"peak_gib": 3.0, "bytes_limit_gib": 60.0}
  cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
  out = device.memory_in_use([cpu])
  assert out["peak_gib"] is None and out["why"].startswith("cpu: ")


def _run(run_program, tmp_path, *args) -> tuple[dict, list[str]]:
  out = tmp_path / "device.json"
  r = run_program(*args, f"--out={out}", module="tinyjax.benchmarks.device")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  assert sum("no accelerator" in line for line in lines) == 1, "the CPU note is printed once"
  assert lines[0].startswith("device: no accelerator") and lines[-1] == f"wrote {out}"
  return json.loads(out.read_text()), lines


@pytest.mark.slow
def test_without_an_accelerator_tiny_runs_on_the_cpu(run_program, tmp_path):
  """No --config and no accelerator: configs/tiny.py on the CPU, said in one line and in the JSON; every figure the
  table prints is there (no timing is asserted)."""
  r, lines = _run(run_program, tmp_path, "--steps=2")
  assert (r["device"], r["config"], r["devices"], r["steps"], r["warmup"]) == ("cpu", "configs/tiny.py", 1, 2, 3)
  assert "instead of configs/c4_50m.py" in r["note"]
  assert (r["shape"]["batch"], r["shape"]["seq_len"], r["shape"]["attention"]) == (16, 128, "reference")
  assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["compile_s"] > 0
  roof = r["roofline"]
  assert roof["bound_s"] > 0 and roof["tokens_per_s_bound"] > 0 and roof["flops"] > 0 and roof["top"]
  assert r["peak_source"] == roof["chip"]["source"] and "measured" in r["peak_source"]  # no data sheet for a CPU
  assert r["memory"]["in_use"]["peak_gib"] is None and r["memory"]["in_use"]["why"].startswith("cpu: ")
  assert r["memory"]["plan_gib"]["peak"] > 0 and r["memory"]["fits"] is True
  assert math.isfinite(r["loss_first"]) and r["loss_last"] < r["loss_first"] and r["bad_steps"] == 0
  for name in ("attention", "loss"):
    assert r["kernels"][name]["ok"] and r["kernels"][name]["max"] < 1e-5, r["kernels"][name]
  assert r["versions"]["jax"] and r["env"]["backend"] == "cpu"
  assert any(line.startswith("step time") and "roofline" in line for line in lines)


@pytest.mark.slow
def test_an_explicit_config_runs_on_the_cpu_as_asked(run_program, tmp_path):
  r, _ = _run(run_program, tmp_path, "--config=configs/tiny.py", "--config.train.train_batch_size=4",
              "--config.model.seq_len=64", "--steps=1", "--warmup=1")
  assert "as asked" in r["note"] and r["config_overrides"] == ["--config.train.train_batch_size=4",
                                                                 "--config.model.seq_len=64"]
  assert (r["shape"]["batch"], r["shape"]["seq_len"]) == (4, 64)
