"""A model's weights in and out of tinyjax: the Hugging Face Llama layout (tensors and config.json, both ways), a
trained run's checkpoint with its tokenizer (`load_run`: export and sample read runs with it), and a fresh run started
from HF weights (`init_from`, config.model.init_from). The export command (export.py) writes what this reads.

Layout facts (transformers models/llama/modeling_llama.py): torch Linear stores (out, in), Flax Dense (in, out), so
every projection kernel and the lm_head are transposed; embeddings and norm scales are copied. Query heads are
grouped by kv head here (head h = g*R + r uses kv head g) and HF's repeat_kv pairs head h with kv head h // R: the
same order, and both use rotate-half RoPE, so q/k need no permutation (tests/test_export.py checks the logits).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from absl import logging

from tinyjax import config
from tinyjax.errors import ConfigError
from tinyjax.data import tokenizer as tokenizers
from tinyjax.model import ModelConfig, Transformer


SHAPE_FIELDS = ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                "tie_word_embeddings", "use_qk_norm", "layer_norm_epsilon", "rope_theta")


def param_map(c: ModelConfig):
  """(tinyjax param path, HF tensor name, transpose) for every parameter, in the order LlamaForCausalLM lists them."""
  yield ("embed_tokens", "embedding"), "model.embed_tokens.weight", False
  for i in range(c.num_layers):
    ours, theirs = f"layers_{i}", f"model.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      yield (ours, "self_attn", proj, "kernel"), f"{theirs}.self_attn.{proj}.weight", True
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield (ours, "mlp", proj, "kernel"), f"{theirs}.mlp.{proj}.weight", True
    for norm in ("input_layernorm", "post_attention_layernorm"):
      yield (ours, norm, "scale"), f"{theirs}.{norm}.weight", False
  yield ("norm", "scale"), "model.norm.weight", False
  if not c.tie_word_embeddings:  # a tied head is the embedding: HF saves no lm_head.weight then
    yield ("lm_head", "kernel"), "lm_head.weight", True


def check_exportable(c: ModelConfig) -> None:
  if c.use_qk_norm:
    raise ConfigError("config.model.use_qk_norm=True cannot be exported: transformers' LlamaForCausalLM has no "
                      "q/k norm (Qwen3 has one but also differs in other ways); train with use_qk_norm=False")


def to_hf(params, c: ModelConfig) -> dict[str, np.ndarray]:
  """tinyjax params -> {HF tensor name: contiguous numpy array in torch layout}."""
  check_exportable(c)
  out = {}
  for path, name, transpose in param_map(c):
    leaf = params
    for key in path:
      leaf = leaf[key]
    leaf = np.asarray(jax.device_get(leaf))
    out[name] = np.ascontiguousarray(leaf.T if transpose else leaf)
  return out


def from_hf(tensors: dict[str, np.ndarray], c: ModelConfig, dtype=None) -> dict:
  """{HF tensor name: array} -> tinyjax params (numpy, nested dicts); names must be exactly LlamaForCausalLM's."""
  expected = {name: (path, transpose) for path, name, transpose in param_map(c)}
  missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
  if missing or unexpected:
    raise ConfigError(f"HF checkpoint does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
  params: dict = {}
  for name, (path, transpose) in expected.items():
    leaf = np.asarray(tensors[name])
    leaf = np.ascontiguousarray(leaf.T if transpose else leaf)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf.astype(dtype or leaf.dtype)
  return params


def hf_config(c: ModelConfig, bos_id: int | None, eos_id: int, dtype: str | None = None) -> dict:
  """config.json of LlamaForCausalLM. rope_theta is written both flat (transformers 4.x, vLLM, llama.cpp) and as
  rope_parameters (transformers 5); torch_dtype and dtype likewise."""
  check_exportable(c)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_dim, "intermediate_size": c.intermediate_dim,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.seq_len,
      "rms_norm_eps": c.layer_norm_epsilon, "rope_theta": c.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
      "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": False, "attention_dropout": 0.0,
      "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
      "torch_dtype": dtype or c.param_dtype, "dtype": dtype or c.param_dtype,
  }


def model_fields(hf: dict, path: str) -> dict:
  """A HF config.json -> the cfg.model fields it fixes; anything tinyjax's Llama cannot express is an error."""
  def need(ok, what):
    if not ok:
      raise ConfigError(f"{path}/config.json: {what}; tinyjax imports only plain Llama (LlamaForCausalLM)")
  need("model_type" in hf, "no model_type (a tinyjax workdir? export it first: python -m tinyjax.export)")
  need(hf["model_type"] == "llama", f"model_type is {hf['model_type']!r}, not 'llama'")
  need(hf.get("hidden_act", "silu") == "silu", f"hidden_act is {hf.get('hidden_act')!r}, not 'silu'")
  need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "the projections have biases")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  need(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope} is not supported")
  heads = hf["num_attention_heads"]
  need(hf.get("head_dim") in (None, hf["hidden_size"] // heads), "head_dim != hidden_size / num_attention_heads")
  return {"hidden_dim": hf["hidden_size"], "intermediate_dim": hf["intermediate_size"],
          "num_layers": hf["num_hidden_layers"], "num_heads": heads,
          "num_kv_heads": hf.get("num_key_value_heads") or heads, "vocab_size": hf["vocab_size"],
          "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)), "use_qk_norm": False,
          "layer_norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
          "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
          "seq_len": hf.get("max_position_embeddings", 2048)}


def safetensors_lib():
  try:
    import safetensors.numpy  # noqa: PLC0415 - optional: only export/import need it
  except ImportError as e:
    raise ConfigError("HF export/import needs the safetensors package: pip install safetensors "
                      "(or pip install -e '.[hf]')") from e
  return safetensors.numpy


def read_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF directory (single file or sharded with an index)."""
  st = safetensors_lib()
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index) and os.path.exists(os.path.join(path, "model.safetensors")):
    raise ConfigError(f"{path} holds both model.safetensors and model.safetensors.index.json (two exports mixed: "
                      "transformers reads one, other tools the other); export again into an empty directory")
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors is read)")
  tensors = {}
  for fname in files:
    tensors.update(st.load_file(os.path.join(path, fname)))
  return tensors


@dataclasses.dataclass
class Run:
  """A training run's checkpoint, read for export or sampling."""
  workdir: str
  step: int
  cfg: dict  # the config the checkpoint was made with (checkpoint meta, as JSON)
  model_cfg: ModelConfig
  params: dict
  tok: tokenizers.Loaded


def model_config(saved_model: dict) -> ModelConfig:
  """cfg.model of a saved config -> ModelConfig; fields added since the run take base()'s defaults."""
  fields = {**config.base().model.to_dict(), **saved_model}
  return ModelConfig(**{f.name: fields[f.name] for f in dataclasses.fields(ModelConfig)})


def run_tokenizer(saved: dict, cache_dir: str | None = None) -> tokenizers.Loaded:
  """The tokenizer a run trained with, found as data.prepare found it (under cache_dir, default the run's
  data.cache_dir); never trains or downloads one."""
  d, vocab = saved["data"], saved["model"]["vocab_size"]
  root, spec = os.path.expanduser(cache_dir or d["cache_dir"]), d["tokenizer"]
  if spec == "builtin":
    path = tokenizers._builtin_path(root, list(d["train_urls"]), vocab)  # noqa: SLF001 - the one path rule
  elif os.path.exists(os.path.expanduser(spec)):
    path = os.path.expanduser(spec)
  else:
    path = os.path.join(root, "tokenizers", "hub", spec.replace("/", "--"), "tokenizer.json")
  if not os.path.exists(path):
    relative = "" if cache_dir or os.path.isabs(os.path.expanduser(d["cache_dir"])) else (
        f" (the run saved data.cache_dir={d['cache_dir']!r} relative to the directory it started in)")
    raise ConfigError(f"the run's tokenizer (data.tokenizer={spec!r}) is not at {path}{relative}; pass --cache_dir=DIR, "
                      "the data.cache_dir the run trained with (or a copy of it)")
  return tokenizers.load(spec if spec != "builtin" else os.path.dirname(path), root, d["train_urls"], vocab)


def load_run(workdir: str, step: int | None = None, cache_dir: str | None = None) -> Run:
  """Params (on the default device) of checkpoint `step` of workdir (default: the newest complete one); the
  tokenizer under cache_dir (default: the run's data.cache_dir)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from tinyjax.runtime import workdir as workdirs  # noqa: PLC0415
  if workdirs.is_remote(workdir):  # gs://...: Orbax reads the bucket's checkpoints in place
    directory = f"{workdir.rstrip('/')}/{workdirs.CHECKPOINTS}"
  else:
    directory = os.path.join(os.path.abspath(workdir), workdirs.CHECKPOINTS)
  if not workdirs.is_remote(workdir) and not os.path.isdir(directory):
    raise ConfigError(f"{workdir}: no checkpoints/ directory (is it a tinyjax workdir with checkpoint.enabled?)")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax notes at WARNING that a read-only manager is read-only
  try:
    manager = ocp.CheckpointManager(directory, options=options)
  finally:
    logging.set_verbosity(verbosity)
  with manager:
    steps = manager.all_steps()
    if not steps:
      raise ConfigError(f"{directory} holds no complete checkpoint yet (the first is written at a save step)")
    if step is not None and step not in steps:
      raise ConfigError(f"--step={step}: {directory} has checkpoints at steps {sorted(steps)}")
    step = max(steps) if step is None else step
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["config"]
    c = model_config(saved["model"])
    tok = run_tokenizer(saved, cache_dir)
    model = Transformer(c, eos_id=tok.eos_id)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, c.seq_len), np.int32))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)}
    # Only the params subtree is read (partial restore): the optimizer state, 2-3x larger, stays on disk.
    restore = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    params = manager.restore(step, args=ocp.args.Composite(state=restore)).state["params"]
  return Run(workdir, step, saved, c, params, tok)


@dataclasses.dataclass
class Imported:
  model: dict  # the cfg.model fields the checkpoint fixes (SHAPE_FIELDS, seq_len)
  params: dict  # tinyjax param tree (numpy)
  bos_id: int | None
  eos_id: int | None


def load_hf(path: str, dtype: str | None = None) -> Imported:
  """A HF Llama directory (config.json + safetensors) -> tinyjax params; dtype casts (default: as stored)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError(f"{path}: not a HF model directory (no config.json)")
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  fields = model_fields(hf, path)
  c = model_config({**fields, "compute_dtype": "float32"})
  eos = hf.get("eos_token_id")
  tensors = {k: v for k, v in read_weights(path).items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
  if c.tie_word_embeddings:
    tensors.pop("lm_head.weight", None)  # some tied checkpoints also store the (identical) head
  return Imported(fields, from_hf(tensors, c, dtype), hf.get("bos_token_id"),
                  eos[0] if isinstance(eos, list) else eos)


def init_from(cfg, state, tx, state_shardings):
  """config.model.init_from: a fresh TrainState whose params are the HF checkpoint's (optimizer state re-initialised
  for them). The run's model config must describe the same model: every differing field is named."""
  imported = load_hf(cfg.model.init_from, cfg.model.param_dtype)
  diff = [f"model.{k} (checkpoint {imported.model[k]!r}, config {cfg.model[k]!r})"
          for k in SHAPE_FIELDS if imported.model[k] != cfg.model[k]]
  if diff:
    raise ConfigError(f"config.model.init_from={cfg.model.init_from!r} holds a different model: {'; '.join(diff)}")
  params = jax.device_put(imported.params, state_shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  return state.replace(params=params, opt_state=opt_state)
