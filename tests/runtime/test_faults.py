"""How a run stops (tinyjax/runtime/faults.py): an overflowing update never reaches the state or a checkpoint, a
preempted-then-resumed run logs exactly the rows of an uninterrupted run, full disks are recognised in every form they
are raised in, and background noise is filtered. (Stop signals: test_signals.py; checkpoints: test_checkpoint.py.)"""
import errno
import logging
import math
import sys

import pytest

from tinyjax.runtime import faults
from tinyjax import errors


@pytest.mark.slow  # a run (~8 s on 2 cores)
def test_overflowing_update_stops_the_run_before_it_is_applied(small_cfg, train_run, tmp_path):
  """Finite loss and gradients, but lr 1e39 overflows the parameters: exit-3 path, nothing saved."""
  cfg = small_cfg(**{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39})
  with pytest.raises(errors.Diverged, match="non-finite parameters or optimizer state after the update at step 1"):
    train_run(cfg, tmp_path)
  saved = [p.name for p in (tmp_path / "checkpoints").iterdir()] if (tmp_path / "checkpoints").exists() else []
  assert not any(name.isdigit() for name in saved), "no checkpoint may hold the overflowed state"


@pytest.mark.slow  # a run (~8 s on 2 cores)
def test_skipped_overflowing_updates_keep_the_state_finite(small_cfg, train_run, rows, tmp_path):
  cfg = small_cfg(**{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39, "train.skip_bad_steps": True})
  train_run(cfg, tmp_path)
  logged = [r for r in rows(tmp_path) if "loss" in r and "event" not in r]
  assert logged[-1]["bad_steps"] == 8, "every update overflowed and was skipped"
  assert all(math.isfinite(r["param_norm"]) for r in logged)
  assert len({round(r["param_norm"], 6) for r in logged}) == 1, "no update was applied"
  events = [r for r in rows(tmp_path) if r.get("event") == "skipped_bad_steps"]
  assert events and "parameters or optimizer state" in events[0]["message"]


# log_every 1 is in the fast tier (the gate on what training computes: a resumed run is the uninterrupted one).
@pytest.mark.parametrize("log_every", [1, pytest.param(5, marks=pytest.mark.slow)])  # two or three runs, ~15-25 s
def test_preempted_run_resumes_to_the_uninterrupted_rows(small_cfg, train_run, stable_rows, reference_run, tmp_path,
                                                         log_every):
  """log_every 1 is the small config's own: its uninterrupted run is the session's reference_run."""
  full, cut = reference_run, tmp_path / "cut"
  if log_every != 1:
    full = tmp_path / "full"
    train_run(small_cfg(**{"train.log_every": log_every}), full)
  with pytest.raises(errors.Preempted):
    train_run(small_cfg(**{"train.log_every": log_every}), cut, stop_at=5)
  train_run(small_cfg(**{"train.log_every": log_every}), cut)
  assert stable_rows(cut) == stable_rows(full), \
      "a resumed run's metrics.jsonl must equal an uninterrupted run's, row for row"


def _chained(inner, outer):
  try:
    try:
      raise inner
    except Exception as e:  # noqa: BLE001
      raise outer from e
  except Exception as e:  # noqa: BLE001
    return e


def test_a_full_disk_is_recognised_in_the_forms_python_tensorstore_and_orbax_raise():
  assert errors.disk_full_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
  assert errors.disk_full_reason(OSError(errno.EDQUOT, "quota")) == "Disk quota exceeded"
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "bad_steps/0" in OCDBT database: Failed to write 17174 '
                           "bytes to file 4: No space left on device [os_error_code='28']")
  assert errors.disk_full_reason(_chained(tensorstore, RuntimeError("Save Finalize thread failed"))) == \
      "No space left on device"
  assert errors.disk_full_reason(_chained(OSError(errno.EACCES, "Permission denied"), RuntimeError("x"))) is None
  assert errors.disk_full_reason(ValueError("NOT_FOUND: manifest.ocdbt")) is None
  assert errors.disk_full_reason(None) is None


class _LateCallback:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_background_noise_filter_drops_only_what_main_reports_itself(monkeypatch, caplog):
  forwarded = []
  monkeypatch.setattr(sys, "unraisablehook", lambda args: forwarded.append(str(args.exc_value)))
  undo = faults.quiet_background_noise()
  try:
    _LateCallback(RuntimeError("Event loop is closed"))  # dropped at once: tensorstore's callback after Orbax's loop
    _LateCallback(RuntimeError("something else"))
    full = OSError(errno.ENOSPC, "No space left on device")
    logging.getLogger("absl").error("save failed", exc_info=(OSError, full, None))
    # Orbax's own account of a multi-process stop came before tinyjax's one line (the stop's step is in that line)
    logging.getLogger("absl").warning("[process=%s][thread=%s] Reached preemption sync point, step=%s", 1, "Main", 5)
    logging.getLogger("orbax").error("a different failure")
  finally:
    undo()
  assert forwarded == ["something else"]
  assert [r.getMessage() for r in caplog.records] == ["a different failure"]
  assert sys.unraisablehook is not None and not logging.getLogger("absl").filters  # undone


def test_a_stop_signal_while_a_finished_program_exits_is_ignored(run_program):
  """benchmarks.chaos found a finished run killed by a SIGHUP 155 ms after its final checkpoint (exit 129): Python's
  finalization resets the handlers it installed to the default action. The last exit handler now ignores them."""
  code = """
import atexit, signal
atexit.register(lambda: print([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGHUP, signal.SIGTERM)]))
from tinyjax.runtime import faults
faults.handle_signals_for_life(grace_s=faults.SETUP_GRACE_S)
"""
  proc = run_program(code=code, timeout=120)
  assert proc.returncode == 0 and proc.stdout == "[True, True]\n", (proc.stdout, proc.stderr)


def test_a_stop_in_setup_of_one_of_several_processes_leaves_at_once(monkeypatch):
  """Alone in setup (a signal before the processes agree), a trainer's normal exit waited in JAX's shutdown for the
  others and was then aborted for a lost peer: two lines and exit 4 (benchmarks.chaos, 2 processes). Now os._exit."""
  monkeypatch.setattr(errors, "_distributed", lambda: True)
  end = errors.ending(errors.StoppedInSetup("stopped by SIGHUP during setup"))
  assert (end.code, end.now, end.line) == (75, True, "tinyjax: stopped by SIGHUP during setup")
  monkeypatch.setattr(errors, "_distributed", lambda: False)
  assert errors.ending(errors.StoppedInSetup("x")).now is False and errors.ending(errors.Preempted("y")).now is False
