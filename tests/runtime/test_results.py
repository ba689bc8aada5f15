"""speedrun_results.json: Marin's 50m entry reproduced from configs/c4_50m.py, CPU peaks unknown, last eval wins.
Workdirs are written without training (conftest's make_workdir)."""
import json
import os

import pytest

from tinyjax.runtime import results


@pytest.fixture(scope="module")
def marin_50m(marin) -> dict:
  with open(marin.speedrun_50m) as f:
    return json.load(f)["runs"][0]["run_info"]


@pytest.fixture(scope="module")
def marin_50m_keys(marin, marin_50m) -> set:
  """Every key of Marin's file, the text fields the bundled copy leaves out (author, description, ...) included."""
  with open(marin.speedrun_50m) as f:
    return set(marin_50m) | set(json.load(f)["source"]["fields_omitted"])


@pytest.fixture(scope="module")
def c4_50m(tmp_path_factory, make_workdir, marin_50m):
  """configs/c4_50m.py on an H200 with Marin's step time and a Paloma c4_en eval."""
  marin = marin_50m
  path = make_workdir(tmp_path_factory.mktemp("c4_50m"), "c4_50m", device_kind="NVIDIA H200",
                      evals={"paloma/c4_en": [1.5, 1.42, 1.401]}, compile_time=marin["training_time"], step_time=0.0,
                      extra_info={"versions": {"jax": "0.10.2"}})
  return results.write_results(path)["runs"][0]["run_info"], path


def test_reproduces_marin_50m_sizes_and_flops(c4_50m, marin_50m):
  ours, marin = c4_50m[0], marin_50m
  assert ours["model_size"] == marin["model_size"] == 50_874_048
  assert ours["total_tokens"] == marin["total_tokens"] == 999_948_288
  assert ours["model_flops"] == marin["model_flops"] == 1.6698528441040896e17
  # Marin's file predates the model_flops_per_token field; it is forward FLOPs/token: model_flops / (3 * tokens).
  assert ours["model_flops_per_token"] == 55_664_640
  assert 3 * ours["model_flops_per_token"] * ours["total_tokens"] == marin["model_flops"]
  # Same step time on the same chip -> Marin's hardware FLOPs to the last bit (time x chips x 989.5e12).
  assert (ours["num_devices"], ours["num_chips"], ours["device_flops"]) == (1, 1, marin["device_flops"])
  assert ours["training_time"] == marin["training_time"]
  assert ours["training_hardware_flops"] == marin["training_hardware_flops"] == 1.1666472839337308e18


def test_marin_schema_and_config_names(c4_50m, marin_50m, marin_50m_keys):
  ours, marin = c4_50m[0], marin_50m
  assert len(marin_50m_keys) == 17 and marin_50m_keys <= set(ours), marin_50m_keys - set(ours)
  for key in ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_kv_heads", "seq_len",
              "tie_word_embeddings", "use_qk_norm", "layer_norm_epsilon", "rope", "activation_function",
              "use_bias", "use_layer_norm_weight", "hybrid_norm", "input_embedding_norm"):
    assert ours["model_config"][key] == marin["model_config"][key], key
  assert ours["train_config"]["train_batch_size"] == marin["train_config"]["train_batch_size"] == 128
  assert ours["train_config"]["num_train_steps"] == marin["train_config"]["num_train_steps"] == 7629
  for key, value in marin["train_config"]["optimizer_config"].items():
    if key in ours["train_config"]["optimizer_config"]:
      assert ours["train_config"]["optimizer_config"][key] == value, key
  assert ours["train_config"]["optimizer_config"]["coefficient_type"] == "simple"


def test_file_is_sorted_and_last_eval_is_reported(c4_50m):
  ours, path = c4_50m
  with open(os.path.join(path, results.RESULTS_FILE)) as f:
    text = f.read()
  assert text == json.dumps({"runs": [{"run_info": ours}]}, indent=2, sort_keys=True)
  assert ours[results.MARIN_BPB_KEY] == 1.401  # the last eval, as Marin's W&B summary value
  extra = ours["tinyjax"]
  assert extra["comparable"] and extra["eval_sets"]["paloma/c4_en"]["bpb_exact"] == pytest.approx(1.401 * 0.99)
  assert extra["device_flops_source"].startswith("tinyjax.flops.PEAK_FLOPS")
  assert extra["versions"] == {"jax": "0.10.2"}  # run_info keys the writer does not know are carried along
  assert extra["environment"]["environment"] == {"XLA_FLAGS": "x"}
  assert extra["notes"] == []


def test_cpu_run_states_unknown_peak_and_non_paloma_eval(tmp_path, make_workdir):
  info = results.write_results(make_workdir(tmp_path, "tiny", evals={"python_docs": [2.4, 2.1]}))
  info = info["runs"][0]["run_info"]
  assert info["device_flops"] is None and info["training_hardware_flops"] is None
  assert info["tinyjax"]["mfu"] is None
  assert results.MARIN_BPB_KEY not in info
  assert not info["tinyjax"]["comparable"]
  assert info["tinyjax"]["eval_sets"]["python_docs"]["bpb"] == 2.1
  notes = " ".join(info["tinyjax"]["notes"])
  assert "'cpu' is unknown" in notes and "not comparable" in notes
  # tiny: 500 steps x 16 x 128; step 1 (5 s, the compile) is left out of the steady-state throughput.
  assert info["training_time"] == pytest.approx(5.0 + 0.1 * 499)
  assert info["tinyjax"]["tokens_per_second"] == pytest.approx(2048 / 0.1)
  assert info["tinyjax"]["tokens_per_second_overall"] == pytest.approx(500 * 2048 / (5.0 + 49.9))


def test_gpu_mfu_and_incomplete_run(tmp_path, make_workdir):
  info = results.write_results(make_workdir(tmp_path, "tiny", device_kind="NVIDIA H100 80GB HBM3", steps=250))
  info = info["runs"][0]["run_info"]
  assert info["device_flops"] == 989.5e12
  assert info["tinyjax"]["mfu"] == pytest.approx(3 * 3_214_336 * 2048 / 0.1 / 989.5e12)
  assert info["tinyjax"]["completed_steps"] == 250
  assert any("incomplete run: 250 of 500" in n for n in info["tinyjax"]["notes"])


def test_a_folder_that_is_no_workdir_is_named(tmp_path):
  """python -m tinyjax.compare RUN rewrites a run's speedrun_results.json through write_results, and prints this."""
  with pytest.raises(OSError, match=f"{tmp_path / 'missing'}: not a tinyjax workdir \\(no config.json\\)"):
    results.write_results(str(tmp_path / "missing"))
