"""HF export/import: config and tokenizer load in transformers, safetensors names/shapes/dtypes as LlamaForCausalLM
declares them, export -> import is the bitwise identity, logits equal transformers' PyTorch Llama (where torch is
installed), config.model.init_from, and the CLI's one-line errors."""
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import export_support

from tinyjax import cli, config, export, optim, step, train, weights
from tinyjax.errors import ConfigError
from tinyjax.data import tokenizer as tokenizers
from tinyjax.model import ModelConfig, Transformer

GQA = export_support.GQA
tokens_without_eos = export_support.tokens_without_eos


def hf_names(c: ModelConfig) -> dict:
  """LlamaForCausalLM's tensors (transformers models/llama/modeling_llama.py), torch (out, in) layout."""
  D, F, K, V = c.hidden_dim, c.intermediate_dim, c.head_dim, c.vocab_size
  names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  H, G = c.num_heads * K, c.num_kv_heads * K
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    names.update({p + "self_attn.q_proj.weight": (H, D), p + "self_attn.k_proj.weight": (G, D),
                  p + "self_attn.v_proj.weight": (G, D), p + "self_attn.o_proj.weight": (D, H),
                  p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                  p + "mlp.down_proj.weight": (D, F), p + "input_layernorm.weight": (D,),
                  p + "post_attention_layernorm.weight": (D,)})
  if not c.tie_word_embeddings:
    names["lm_head.weight"] = (V, D)
  return names


@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_names_shapes_dtypes(tmp_path, tok, tied, make_run):
  safetensors = pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  c = dataclasses.replace(GQA, tie_word_embeddings=tied)
  export.export(make_run(tok, c), str(tmp_path))
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    got = {name: f.get_slice(name).get_shape() for name in f.keys()}
    dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert f.metadata() == {"format": "pt"}, "transformers requires format=pt metadata"
  assert got == {k: list(v) for k, v in hf_names(c).items()}
  assert dtypes == {"F32"}, "float32 master weights are exported as stored"


@pytest.mark.parametrize("tied", [False, True])
def test_export_import_is_bitwise_identity(tmp_path, tok, tied, make_run):
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  run = make_run(tok, dataclasses.replace(GQA, tie_word_embeddings=tied))
  export.export(run, str(tmp_path), max_shard_bytes=60_000)  # ~0.4 MB of weights: several shards plus an index
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
  imported = weights.load_hf(str(tmp_path))
  assert jax.tree.structure(imported.params) == jax.tree.structure(run.params)
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(run.params)):
    assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b)), "export -> import changed a parameter"
  assert {k: imported.model[k] for k in weights.SHAPE_FIELDS} == {k: getattr(run.model_cfg, k) for k in
                                                                 weights.SHAPE_FIELDS}
  assert (imported.bos_id, imported.eos_id) == (run.tok.bos_id, run.tok.eos_id)


def test_bfloat16_export_rounds_once(tmp_path, tok, make_run):
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  run = make_run(tok)
  export.export(run, str(tmp_path), dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  imported = weights.load_hf(str(tmp_path))
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(run.params)):
    assert a.dtype == jnp.bfloat16 and np.array_equal(a, np.asarray(b.astype(jnp.bfloat16)))
  assert weights.load_hf(str(tmp_path), "float32").params["norm"]["scale"].dtype == np.float32


def test_transformers_loads_config_and_tokenizer(tmp_path, tok, make_run):
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' installs transformers")
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  export.export(make_run(tok), str(tmp_path))
  hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert type(hf).__name__ == "LlamaConfig" and hf.architectures == ["LlamaForCausalLM"]
  assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
          hf.num_key_value_heads, hf.vocab_size, hf.head_dim) == (64, 128, 2, 4, 2, 320, 16)
  assert (hf.rms_norm_eps, hf.tie_word_embeddings, hf.bos_token_id, hf.eos_token_id) == (1e-5, False, 0, 1)
  rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}  # transformers 5 | 4
  assert rope["rope_theta"] == 10000.0
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in ["The Python interpreter", "zz unseen wörds", ""]:
    ours = tok.tokenizer.encode(text, add_special_tokens=True).ids
    assert hf_tok(text)["input_ids"] == ours, f"transformers encodes {text!r} differently"
    assert ours[0] == tok.bos_id and tok.eos_id not in ours, "prompts: BOS first, no EOS"
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1)
  assert hf_tok.decode(tok.tokenizer.encode("def f(x):", add_special_tokens=True).ids, skip_special_tokens=True) \
      == "def f(x):"


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_pytorch_llama(tmp_path, tok, tied, make_run):
  """max |Δlogit| <= 1e-4 in fp32 on a GQA shape; every tensor of a sharded export loads with no missing/unexpected
  key."""
  torch = pytest.importorskip("torch", reason="pip install -e '.[test]' installs torch")
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' installs transformers")
  c = dataclasses.replace(GQA, tie_word_embeddings=tied)
  run = make_run(tok, c, seed=3)
  export.export(run, str(tmp_path), max_shard_bytes=100_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True,
                                                               attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  declared = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight" or not
              hf.config.tie_word_embeddings}
  assert declared == hf_names(c), "our name/shape table differs from LlamaForCausalLM's own"
  assert {str(v.dtype) for v in hf.state_dict().values()} == {"torch.float32"}
  tokens = tokens_without_eos(7, (3, GQA.seq_len))  # no EOS: HF has no document masking
  ours = np.asarray(Transformer(c, eos_id=tok.eos_id).apply({"params": run.params}, tokens))
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert ours.std() > 0.5, "logits too small for the parity bound to mean anything"
  assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()


def test_tokenizer_config_of_the_source_is_kept(tmp_path, tok):
  """A hub tokenizer's own tokenizer_config.json (chat template, class, ...) is exported as downloaded."""
  src = tmp_path / "hub"
  src.mkdir()
  (src / "tokenizer.json").write_text(open(tok.path, encoding="utf-8").read())
  own = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", "chat_template": "{{ messages }}"}
  (src / "tokenizer_config.json").write_text(json.dumps(own))
  hub_tok = tokenizers.load(str(src), str(tmp_path), [], GQA.vocab_size)
  written = export.write_tokenizer(hub_tok, str(tmp_path), 32)
  assert written == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
  assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == own
  assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
      "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def test_qk_norm_model_refused_with_reason(tmp_path, tok, make_run):
  with pytest.raises(ConfigError, match="use_qk_norm.*LlamaForCausalLM has no q/k norm"):
    export.export(make_run(tok, dataclasses.replace(GQA, use_qk_norm=True)), str(tmp_path))


def test_import_refuses_other_architectures(tmp_path, tok, make_run):
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  export.export(make_run(tok), str(tmp_path))
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "attention_bias": True}))
  with pytest.raises(ConfigError, match="biases"):
    weights.load_hf(str(tmp_path))
  with pytest.raises(ConfigError, match="not a HF model directory"):
    weights.load_hf(str(tmp_path / "nowhere"))


def test_cli_exports_a_checkpoint_and_init_from_loads_it(tmp_path, tok, write_checkpoint):
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  params = write_checkpoint(tmp_path / "run", tok)
  export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
  for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"):
    assert (tmp_path / "hf" / name).exists(), name
  # config.model.init_from: a fresh TrainState takes the HF weights and a matching optimizer state.
  cfg = config.base()
  for f in dataclasses.fields(ModelConfig):
    cfg.model[f.name] = getattr(GQA, f.name)
  cfg.model.init_from = str(tmp_path / "hf")
  tx = optim.make(cfg, 10)
  state = step.init_state(Transformer(GQA, eos_id=1), tx, 0)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  loaded = weights.init_from(cfg, state, tx, shardings)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(loaded.opt_state) == jax.tree.structure(state.opt_state)
  cfg.model.num_layers = 3
  with pytest.raises(ConfigError, match=r"different model: model.num_layers \(checkpoint 2, config 3\)"):
    weights.init_from(cfg, state, tx, shardings)


def test_cli_errors_are_one_line(tmp_path, tok, capsys, write_checkpoint):
  write_checkpoint(tmp_path / "run", tok, dataclasses.replace(GQA, use_qk_norm=True))
  run, out = str(tmp_path / "run"), str(tmp_path / "hf")
  for argv, message in [([run, "--out", out], "use_qk_norm=True cannot be exported"),
                        ([run, "--out", out, "--step", "9"], r"--step=9: .* steps \[5\]"),
                        ([str(tmp_path / "none"), "--out", out], "no checkpoints/ directory"),
                        ([run, "--out", out, "--max_shard_size", "lots"], "--max_shard_size='lots' is invalid")]:
    with pytest.raises(SystemExit) as e:
      export.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("tinyjax: error: ")
    assert re.search(message, err), err
  assert not (tmp_path / "hf").exists(), "a refused export must write nothing"


@pytest.fixture(scope="module")
def run_a(tok, make_run):
  return make_run(tok)  # strong_params dominates these tests' time: made once


def _files(folder) -> set[str]:
  return {p.name for p in folder.iterdir()}


def test_export_replaces_a_previous_export_whole(tmp_path, run_a):
  """Run A as one file, then run B as shards into the same --out: only B's files remain (a stale model.safetensors
  is what transformers would load), and a bf16 export left behind does not survive a float32 one."""
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  out = tmp_path / "hf"
  run_b = dataclasses.replace(run_a, params=jax.tree.map(lambda x: np.asarray(x) + 1.0, run_a.params))
  export.export(run_a, str(out))
  assert "model.safetensors" in _files(out)
  written = export.export(run_b, str(out), max_shard_bytes=60_000)
  assert _files(out) == set(written) and "model.safetensors" not in written
  for a, b in zip(jax.tree.leaves(weights.load_hf(str(out)).params), jax.tree.leaves(run_b.params)):
    assert np.array_equal(a, np.asarray(b))
  export.export(run_a, str(out), max_shard_bytes=60_000, dtype="bfloat16")
  written = export.export(run_a, str(out))  # float32, one file: the bf16 shards and their index go
  assert _files(out) == set(written) and not any(n.startswith("model-") for n in _files(out))
  imported = weights.load_hf(str(out))
  assert {a.dtype for a in jax.tree.leaves(imported.params)} == {np.dtype("float32")}
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
  (out / f"{export.STAGING}left-by-a-kill").mkdir()  # a killed export's staging folder is ours: cleaned up
  export.export(run_b, str(out))
  assert _files(out) == set(written)


def test_export_refuses_a_folder_with_other_files(tmp_path, tok, capsys, write_checkpoint):
  """Nothing of the user's is deleted: an --out holding other files is one line, exit 2, and stays as it was."""
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  write_checkpoint(tmp_path / "run", tok)
  out = tmp_path / "hf"
  export.main([str(tmp_path / "run"), "--out", str(out)])
  (out / "notes.txt").write_text("mine")
  (out / "data").mkdir()
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  with pytest.raises(SystemExit) as e:
    export.main([str(tmp_path / "run"), "--out", str(out), "--dtype", "bfloat16"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1
  assert f"--out={out} holds files that are not a HF export (data, notes.txt); nothing was written" in err
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit):
    export.main([str(tmp_path / "run"), "--out", str(tmp_path / "file")])
  assert "is a file, not a directory" in capsys.readouterr().err


def test_mixed_single_and_sharded_weights_are_refused(tmp_path, run_a):
  pytest.importorskip("safetensors", reason="pip install -e '.[test]' installs safetensors")
  export.export(run_a, str(tmp_path / "a"), max_shard_bytes=60_000)
  export.export(run_a, str(tmp_path / "b"))
  shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a")  # what older tinyjax left behind
  with pytest.raises(ConfigError, match="holds both model.safetensors and model.safetensors.index.json"):
    weights.load_hf(str(tmp_path / "a"))


def test_a_run_with_a_relative_cache_dir_exports_from_anywhere(tmp_path, tok, monkeypatch, capsys, write_checkpoint):
  """New runs save data.cache_dir resolved; a run saved with a relative one (older tinyjax) is found with
  --cache_dir, and without it the one line says so."""
  from tinyjax import sample  # noqa: PLC0415
  monkeypatch.chdir(tmp_path)
  assert train.resolve_cache_dir("cache") == str(tmp_path / "cache")
  assert train.resolve_cache_dir("~/.cache/tinyjax") == "~/.cache/tinyjax"  # per user, not per directory
  cfg = config.base()
  vocab = GQA.vocab_size
  builtin = tokenizers._builtin_path("cache", list(cfg.data.train_urls), vocab)  # noqa: SLF001
  os.makedirs(os.path.dirname(builtin))
  shutil.copy(tok.path, builtin)
  write_checkpoint(tmp_path / "run", tok, tokenizer="builtin", cache_dir="cache")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  with pytest.raises(SystemExit) as e:
    sample.main([str(tmp_path / "run"), "--max_new_tokens", "2"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1
  assert "(the run saved data.cache_dir='cache' relative to the directory it started in); pass --cache_dir=DIR" in err
  export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--cache_dir", str(tmp_path / "cache")])
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == vocab
  assert capsys.readouterr().out.startswith("exported step 5 of ")
  sample.main([str(tmp_path / "run"), "--max_new_tokens", "2", "--cache_dir", str(tmp_path / "cache"), "--json"])
  assert [s["prompt"] for s in json.loads(capsys.readouterr().out)] == list(sample.SAMPLE_PROMPTS)


@pytest.mark.parametrize("module", ["export", "sample", "compare", "plot", "sweep", "envdiff", "stability",
                                    "launch.tpu", "launch.slurm"])
def test_help_text_is_whole_sentences(module, capsys):
  """--help's description is the module docstring's first paragraph, whole (it was cut at the first line)."""
  import importlib  # noqa: PLC0415
  m = importlib.import_module(f"tinyjax.{module}")
  with pytest.raises(SystemExit) as e:
    m.main(["--help"])
  out = capsys.readouterr().out
  description = " ".join(out.split("\n\n")[1].split())
  assert e.value.code == 0 and description.endswith(".") and description == cli.summary(m.__doc__)
