"""The training-run profiler (tinyjax/runtime/profile.py, config.train.profile_steps): op events of a synthetic
trace summed by part with exact sums (one device, one module, nested events counted once, device events preferred
over their host annotations), the window's validation, and one small run traced on this CPU."""
import glob
import gzip
import json
import os
import types

import fsspec
import pytest

from tinyjax import config, errors
from tinyjax.runtime import profile

PARTS = {"fusion.1": "loss", "dot.2": "projections_mlp", "while.3": "other", "fusion.4": "optimizer"}


def op(name, ts, dur, tid=7, ordinal="0", module="jit_step", **args):
  """A CPU op event as XLA's thunk executor records it (times in µs)."""
  return {"ph": "X", "pid": 701, "tid": tid, "ts": ts, "dur": dur, "name": name,
          "args": {"hlo_op": name, "hlo_module": module, "device_ordinal": ordinal, **args}}


def cpu_trace():
  """Two steps of device 0 on two threads, plus what must not count: device 1, another module, host events."""
  return {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:CUSTOM:Megascale Trace"}},
      {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
      op("fusion.1", 0, 100), op("dot.2", 100, 250, tid=8),
      op("while.3", 400, 1000), op("fusion.4", 500, 400),  # a loop's event holds its body's: counted once
      op("fusion.1", 2000, 300), op("dot.2", 2300, 250, tid=8), op("while.3", 2600, 1000), op("fusion.4", 2700, 400),
      op("rng.9", 3700, 50),  # of the step's module, but no kernel of it
      op("fusion.1", 0, 999, ordinal="1"),  # device 1 runs the same program
      op("fusion.1", 4000, 999, module="jit_eval_step"),  # another program
      {"ph": "X", "pid": 701, "tid": 7, "ts": 101, "dur": 1, "name": "end: fusion.1", "args": {}},
      {"ph": "X", "pid": 701, "tid": 9, "ts": 0, "dur": 4000, "name": "ThunkExecutor::Execute (wait for completion)"},
  ]}


def test_op_events_sum_by_part():
  seconds, events = profile.op_seconds(cpu_trace(), PARTS, "jit_step")
  assert seconds == pytest.approx({"loss": 400e-6, "projections_mlp": 500e-6, "other": 1200e-6, "optimizer": 800e-6,
                                   "unattributed": 50e-6}, abs=1e-12)
  assert events == 9


def test_device_events_preferred_over_host_annotations():
  """A GPU's kernels (in a /device: process, named by the kernel) carry the op; the host's launch annotations do too
  and must not count twice. A TPU-style event is named by the op alone."""
  trace = {"traceEvents": [
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 701, "tid": 1, "ts": 0, "dur": 90, "name": "fusion.1:#hlo_op=fusion.1,hlo_module=jit_step#"},
      {"ph": "X", "pid": 2, "tid": 5, "ts": 10, "dur": 30, "name": "loop_fusion_kernel",
       "args": {"hlo_op": "fusion.1", "hlo_module": "jit_step"}},
      {"ph": "X", "pid": 2, "tid": 5, "ts": 40, "dur": 20, "name": "sm90_gemm",
       "args": {"annotation": "dot.2:#hlo_op=dot.2#"}},
      {"ph": "X", "pid": 2, "tid": 6, "ts": 60, "dur": 5, "name": "fusion.4"},
  ]}
  seconds, events = profile.op_seconds(trace, PARTS, "jit_step")
  assert seconds == pytest.approx({"loss": 30e-6, "projections_mlp": 20e-6, "optimizer": 5e-6}, abs=1e-12)
  assert events == 3


def test_summary_table_and_remote_copy(tmp_path, capsys):
  directory = tmp_path / "local" / profile.DIR / "plugins" / "profile" / "2026_01_01_00_00_00"
  directory.mkdir(parents=True)
  with gzip.open(directory / "vm.trace.json.gz", "wt") as f:
    json.dump(cpu_trace(), f)
  trace, path = profile.read_trace(str(tmp_path / "local" / profile.DIR))
  assert path.endswith("vm.trace.json.gz")
  bounds = {"loss": 0.1e-3, "projections_mlp": 0.3e-3, "other": 0.0, "optimizer": 0.2e-3, "attention": 0.4e-3}
  prediction = {"bound_s": 1e-3, "by_part": {p: {"bound_s": bounds.get(p, 0.0)} for p in profile.roofline.PARTS}}
  summary = profile.summarize(trace, PARTS, "jit_step", 2, prediction)
  assert summary["parts"]["loss"] == pytest.approx({"measured_ms": 0.2, "measured_share": 400 / 2950,
                                                    "bound_ms": 0.1, "bound_share": 0.1})
  assert summary["parts"]["unattributed"] == pytest.approx({"measured_ms": 0.025, "measured_share": 50 / 2950,
                                                            "bound_ms": None, "bound_share": None})
  assert summary["total"] == pytest.approx({"measured_ms": 1.475, "bound_ms": 1.0})
  summary.update(first_step=5, last_step=6, directory="gs://b/run/profile", wall_ms_per_step=2.5, device="cpu",
                 chip_source="measured on this CPU", peak_flops=1.5e11, hbm_bandwidth=2e10)
  fs = fsspec.filesystem("memory")
  wd = types.SimpleNamespace(local=str(tmp_path / "local"), remote=True, fs=fs, root="/bucket/run")
  profile.write(summary, wd)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "profile of steps 5-6 in gs://b/run/profile: 2.50 ms/step wall, 9 op events on one device"
  assert lines[1].split() == ["part", "measured", "ms/step", "share", "roofline", "ms/step", "share"]
  assert lines[2].split() == ["loss", "0.200", "14%", "0.100", "10%"]
  assert lines[-3].split() == ["unattributed", "0.025", "2%", "-", "-"]
  assert lines[-2].split() == ["total", "1.475", "1.000"] and lines[-1] == "roofline of cpu: measured on this CPU: 0.15 TFLOP/s, 20 GB/s"
  assert json.loads(fs.cat(f"/bucket/run/{profile.DIR}/{profile.SUMMARY}")) == json.loads(json.dumps(summary))
  assert fs.exists(f"/bucket/run/{profile.DIR}/plugins/profile/2026_01_01_00_00_00/vm.trace.json.gz")


def window_cfg(spec, **train):
  cfg = config.base()
  cfg.model.vocab_size, cfg.model.seq_len = 512, 32
  cfg.train.update({"num_train_steps": 8, "steps_per_eval": 4, "profile_steps": spec, **train})
  cfg.checkpoint.save_interval_steps = 4
  return cfg


@pytest.mark.parametrize("spec, train, window", [
    ("", {}, None), ("0:0", {}, None), ("0:4", {}, (0, 4)), ("4:8", {}, (4, 8)), ("5:7", {}, (5, 7)),
    ("2:4", {"steps_per_eval": 8}, (2, 4)),  # the checkpoint at step 4 is saved after the window
])
def test_valid_windows(spec, train, window):
  config.validate(window_cfg(spec, **train))
  assert config.profile_window(spec) == window


@pytest.mark.parametrize("spec, train, message", [
    ("3", {}, 'must be "START:STOP" with whole numbers 0 <= START < STOP'),
    ("a:b", {}, 'must be "START:STOP"'), ("5:3", {}, 'must be "START:STOP"'), ("4:4", {}, 'must be "START:STOP"'),
    ("-1:2", {}, 'must be "START:STOP"'), ("1:2:3", {}, 'must be "START:STOP"'),
    ("4:9", {}, "STOP must be <= the run's 8 training steps"),
    ("2:6", {}, r"step 4 runs an eval \(train.steps_per_eval=4\)"),
    ("4:7", {"dynamics_every": 7}, r"step 7 is a dynamics step \(train.dynamics_every=7\)"),
    ("2:6", {"steps_per_eval": 8}, r"step 4 saves a checkpoint \(checkpoint.save_interval_steps=4\)"),
])
def test_invalid_windows_name_the_field(spec, train, message):
  with pytest.raises(config.ConfigError, match=rf"^config.train.profile_steps='{spec}' is invalid: {message}"):
    config.validate(window_cfg(spec, **train))


def test_open_is_off_or_clamped_to_the_resumed_step(tmp_path, capsys):
  wd = types.SimpleNamespace(local=str(tmp_path), path=str(tmp_path), remote=False)
  assert profile.Profiler.open("", wd, 0) is None and profile.Profiler.open("0:0", wd, 0) is None
  assert profile.Profiler.open("2:4", wd, 4) is None
  assert "the run resumes at step 4, after the window: not traced" in capsys.readouterr().out
  prof = profile.Profiler.open("2:6", wd, 3)
  assert (prof.first, prof.stop) == (3, 6)


@pytest.mark.slow
def test_profiled_run(small_cfg, train_run, reference_run, final_sha, tmp_path, capsys):
  """Steps 5-7 of the small run traced (evals and checkpoints at 4 and 8 stay outside); the run itself unchanged."""
  cfg = small_cfg(**{"train.profile_steps": "4:7"})
  config.validate(cfg)
  train_run(cfg, tmp_path)
  out = capsys.readouterr().out
  run = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(run) == 1 and glob.glob(f"{run[0]}/*.xplane.pb") and glob.glob(f"{run[0]}/*.trace.json.gz")
  with open(tmp_path / "profile" / "summary.json") as f:
    summary = json.load(f)
  assert (summary["first_step"], summary["last_step"], summary["platform"]) == (5, 7, "cpu")
  assert list(summary["parts"]) == [*profile.roofline.PARTS, "unattributed"]
  assert summary["parts"]["loss"]["measured_ms"] > 0 and summary["parts"]["projections_mlp"]["measured_ms"] > 0
  assert summary["wall_ms_per_step"] > 0 and summary["total"]["bound_ms"] > 0 and summary["op_events"] > 0
  lines = out.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("profile of steps 5-7 in "))
  assert lines[head + 1].split()[:3] == ["part", "measured", "ms/step"]
  assert [line.split()[0] for line in lines[head + 2:head + 11]] == [*profile.roofline.PARTS, "unattributed", "total"]
  assert lines[head + 11].startswith("roofline of cpu: measured on this CPU")
  assert final_sha(tmp_path) == final_sha(reference_run), "profiling must not change training"


@pytest.mark.slow
def test_stop_inside_the_window_then_resume(small_cfg, train_run, reference_run, final_sha, tmp_path, capsys):
  """A preemption at step 6 ends the trace (kept, no summary: the window did not end); the resumed run traces what
  is left of the window, step 7, and trains exactly as an uninterrupted run."""
  cfg = small_cfg(**{"train.profile_steps": "4:7"})
  with pytest.raises(errors.Preempted):
    train_run(cfg, tmp_path, stop_at=6)
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
  assert not os.path.exists(tmp_path / "profile" / "summary.json")
  train_run(cfg, tmp_path)
  assert "profile of step 7 in " in capsys.readouterr().out
  with open(tmp_path / "profile" / "summary.json") as f:
    summary = json.load(f)
  assert (summary["first_step"], summary["last_step"]) == (7, 7)
  assert final_sha(tmp_path) == final_sha(reference_run)
