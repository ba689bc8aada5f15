"""The command line: --dry_run reproduces Marin's numbers; user mistakes are one line on stderr and exit code 2."""
import pytest


@pytest.mark.slow  # a c4-sized step compiled for the FLOP audit (~10 s each)
# max_executed: issue 18's targets for the FLOP audit's executed / model matmul FLOPs (optimizer excluded).
@pytest.mark.parametrize("name,model_size,steps,tokens,model_flops,max_executed", [
    ("c4_30m", 33_784_960, 4_577, 599_916_544, None, 1.02),
    ("c4_50m", 50_874_048, 7_629, 999_948_288, 1.6698528441040896e17, 1.01),  # Marin llama_50m_muon_1x
    ("c4_75m", 73_273_600, 11_444, 1_499_987_968, None, 1.02),
    ("c4_130m", 154_147_328, 4_959, 2_599_944_192, 1.777337490915459e18, 0.95),  # Marin muon_llama_scaling/130m
])
def test_dry_run_reproduces_marin(shipped_dry_run, name, model_size, steps, tokens, model_flops, max_executed):
  plan = shipped_dry_run(name)
  assert plan["model_size"] == model_size, "Marin's total_trainable_params must match exactly"
  assert plan["num_train_steps"] == steps and plan["total_tokens"] == tokens, "Marin's 20*P//(B*S) step rule"
  assert plan["model_flops"] == pytest.approx(3 * plan["flops_per_token"] * tokens, rel=1e-12)
  if model_flops is not None:
    assert abs(plan["model_flops"] / model_flops - 1) < 1e-9, "model_flops differs from the leaderboard"
  groups = plan["optimizer_groups"]
  assert "lm_head/kernel" in groups["adam"] and "embed_tokens/embedding" in groups["adam"]
  assert all(p.endswith("kernel") and "lm_head" not in p for p in groups["muon"])
  assert {"mesh", "env", "non_embedding_params", "flops_per_token", "tokens_per_step"} <= plan.keys()
  audit = plan["flop_audit"]
  assert audit["model_flops_per_step"] == pytest.approx(3 * plan["flops_per_token"] * plan["tokens_per_step"])
  assert audit["executed_over_model"] <= max_executed, audit


# The CLI end to end on refusals raised past config.validate (the env options and the data-parallel size of the
# forced host devices); the parser's and config.validate's own refusals are tests/test_config.py's catalogue.
@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--config.env.xla_python_client_allocator=foo"],
     "config.env.xla_python_client_allocator='foo' is invalid: allowed: default, platform, bfc, cuda_async"),
    (["--config.train.train_batch_size=3", "--config.env.host_device_count=2"],
     "config.train.train_batch_size=3 is invalid: must be divisible by the data-parallel size 2"),
])
def test_bad_input_is_one_line_exit_2(run_program, args, message):
  r = run_program("--config=configs/c4_50m.py", "--dry_run", *args)
  assert r.returncode == 2, f"user mistakes exit 2, got {r.returncode}: {r.stderr}"
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, f"expected one line, got: {r.stderr}"
  assert message in lines[0]
