"""Checkpoints a stop or a crash left behind (tinyjax/runtime/checkpoint.py): a damaged or half-renamed newest
checkpoint is moved aside and the run resumes from the previous one to the same end; a stop after the final
checkpoint leaves records the rerun finishes. (SIGKILL at random moments: test_checkpoint_kill.py.)"""
import json
import os
import shutil

import pytest


@pytest.mark.slow  # a rerun (~8 s on 2 cores)
@pytest.mark.parametrize("results", ["missing", "stale"])
def test_rerun_finishes_records_a_stop_after_the_final_checkpoint_left(reference_run, train_run, small_cfg, rows,
                                                                         final_sha, tmp_path, results):
  """Killed after the final checkpoint was committed but before the end-of-run records: the rerun writes them.
  stale: speedrun_results.json written while run_info.json said "preempted" (a stop at the final step; found by
  benchmarks.chaos: before, it kept that status for good)."""
  w = tmp_path / "w"
  shutil.copytree(reference_run, w)
  full = rows(reference_run)
  with open(w / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in full if "param_sha256" not in r)
  doc = json.loads((w / "speedrun_results.json").read_text())
  assert doc["runs"][0]["run_info"]["tinyjax"]["status"] == "completed"
  os.remove(w / "speedrun_results.json")
  if results == "stale":
    doc["runs"][0]["run_info"]["tinyjax"]["status"] = "preempted"
    (w / "speedrun_results.json").write_text(json.dumps(doc))
  info = json.loads((w / "run_info.json").read_text())
  (w / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
  train_run(small_cfg(), w)
  assert final_sha(w) == [r["param_sha256"] for r in full if "param_sha256" in r]
  assert json.loads((w / "run_info.json").read_text())["status"] == "completed"
  assert json.loads((w / "speedrun_results.json").read_text())["runs"][0]["run_info"]["tinyjax"]["status"] == "completed"


@pytest.mark.slow  # two runs (~15 s on 2 cores)
def test_newest_checkpoint_holding_only_state_is_never_resumed_from(reference_run, train_run, small_cfg, final_sha,
                                                                     tmp_path, capsys):
  """The shape a kill can leave where a save's finishing rename is not atomic (a gcsfuse-mounted workdir copies
  then deletes each object; on gs:// Orbax writes into <step>/ and marks it complete last): <step>/ with only
  state/. It is skipped and kept aside, and the run resumes from the previous checkpoint to the same end."""
  w = tmp_path / "w"
  shutil.copytree(reference_run, w)
  for name in os.listdir(w / "checkpoints" / "8"):
    if name != "state":
      target = w / "checkpoints" / "8" / name
      shutil.rmtree(target) if target.is_dir() else target.unlink()
  train_run(small_cfg(), w)
  assert "resuming from checkpoint at step 4/8" in capsys.readouterr().out
  assert any(n.startswith("8.corrupt-") for n in os.listdir(w / "checkpoints"))
  assert final_sha(w) == final_sha(reference_run) and len(final_sha(reference_run)) == 1


@pytest.mark.slow  # two runs (~15 s on 2 cores)
def test_damaged_newest_checkpoint_is_moved_aside_and_reruns_keep_working(reference_run, train_run, small_cfg,
                                                                          final_sha, tmp_path):
  """Item 1: a damaged newest checkpoint -> resume from the previous one, the damaged one kept as
  <step>.corrupt-<time>; the run ends where an uninterrupted one ends, and a further rerun still works.
  Item 2: a stray numbered folder gets the same fallback instead of a KeyError."""
  w = tmp_path / "w"
  shutil.copytree(reference_run, w)  # a finished run of the small config
  os.remove(w / "checkpoints" / "8" / "state" / "manifest.ocdbt")
  train_run(small_cfg(), w)
  names = sorted(os.listdir(w / "checkpoints"))
  assert "8" in names and any(n.startswith("8.corrupt-") for n in names), names
  assert final_sha(w)[-1] == final_sha(reference_run)[-1]
  (w / "checkpoints" / "99").mkdir()
  assert train_run(small_cfg(), w) == {"step": 8}, "the stray folder is skipped; step 8 is complete"
  assert any(n.startswith("99.corrupt-") for n in os.listdir(w / "checkpoints"))


@pytest.mark.slow  # a rerun (~8 s on 2 cores)
def test_a_rerun_removes_what_a_kill_during_orbaxs_deletions_left(reference_run, train_run, small_cfg, final_sha,
                                                                   tmp_path, capsys):
  """A kill -9 right after the final checkpoint, while Orbax drops an older one: before, Orbax deleted it file by
  file and a half-deleted folder (`2/state` only) stayed for good; now a dropped checkpoint is renamed into
  checkpoints/deleting/ first. The rerun of the finished run removes a half-deleted folder, what deleting/ holds, and
  a checkpoint the kill kept from being dropped (max_to_keep=2: 4 and 8 are kept, as an uninterrupted run keeps)."""
  w = tmp_path / "w"
  shutil.copytree(reference_run, w)
  ckpts = w / "checkpoints"
  (ckpts / "2" / "state" / "d").mkdir(parents=True)  # half deleted: only directories left
  shutil.copytree(ckpts / "4", ckpts / "deleting" / "3")  # renamed for deletion, not yet removed
  shutil.copytree(ckpts / "4", ckpts / "1")  # committed before the final save, never dropped
  assert train_run(small_cfg(**{"checkpoint.max_to_keep": 2}), w) == {"step": 8}
  assert sorted(os.listdir(ckpts)) == ["4", "8"]
  assert "removed the incomplete (half-deleted) checkpoint folder(s) [2]" in capsys.readouterr().out
  assert final_sha(w) == final_sha(reference_run)
