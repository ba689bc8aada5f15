"""Export a run to Hugging Face: a run's checkpoint -> a LlamaForCausalLM directory (config, safetensors, generation
config, tokenizer files), through weights.py (the layout, both ways).

  python -m tinyjax.export WORKDIR [--step N] --out DIR [--max_shard_size 5GB] [--dtype D] [--cache_dir DIR]

An --out that already holds an export (files named as transformers' save_pretrained names them) is replaced whole:
the new files are written aside in --out, then the old export's files are removed and the new ones moved in, so no
stale weights of another run or dtype stay behind. An --out holding anything else is refused, and nothing is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

from tinyjax import cli, config
from tinyjax.errors import ConfigError
from tinyjax.data import tokenizer as tokenizers
from tinyjax.weights import Run, check_exportable, hf_config, load_run, safetensors_lib, to_hf

DEFAULT_MAX_SHARD = 5_000_000_000  # transformers 4.x save_pretrained default ("5GB"): one file below this
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]B)?\s*$", re.IGNORECASE)
STAGING = ".tinyjax-export-"  # the new export is written into --out/.tinyjax-export-XXXX, then moved into place
# What transformers' save_pretrained writes for a Llama (model, generation config, weights, tokenizer): an --out
# holding only these (and our staging folders) is a previous export and is replaced; anything else is the user's.
EXPORT_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens)\.json"
                         r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                         r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json"
                         r"|tokenizer\.model|vocab\.json|merges\.txt|chat_template\.(jinja|json)")


def parse_size(text: str) -> int:
  """'5GB' / '200MB' / '123' (bytes) -> bytes, decimal units as transformers' max_shard_size."""
  m = _SIZE.match(str(text))
  if not m:
    raise ConfigError(f"--max_shard_size={text!r} is invalid: a size such as 5GB, 200MB or a byte count")
  unit = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2) and m.group(2).upper()]
  return int(float(m.group(1)) * unit)


def write_weights(tensors: dict[str, np.ndarray], out: str, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes
  (greedy in parameter order, as transformers shards). Returns the files written."""
  st = safetensors_lib()
  shards, size = [[]], 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += arr.nbytes
  meta = {"format": "pt"}  # transformers refuses safetensors files without this metadata
  if len(shards) == 1:
    _write_bytes(os.path.join(out, "model.safetensors"), st.save(tensors, metadata=meta))
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, names in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_bytes(os.path.join(out, fname), st.save({n: tensors[n] for n in names}, metadata=meta))
    files.append(fname)
    weight_map.update({n: fname for n in names})
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
  _write_json(os.path.join(out, "model.safetensors.index.json"), index)
  return files + ["model.safetensors.index.json"]


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:  # not safetensors.save_file, which leaves the file mode 0600
    f.write(data)


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_tokenizer(tok: tokenizers.Loaded, out: str, max_len: int) -> list[str]:
  """tokenizer.json as trained/downloaded, plus tokenizer_config.json and special_tokens_map.json: the source's
  own when it has them (hub tokenizers), else written for PreTrainedTokenizerFast, which applies tokenizer.json's
  post-processor unchanged (BOS added exactly as tinyjax's data pipeline adds it)."""
  shutil.copyfile(tok.path, os.path.join(out, "tokenizer.json"))
  special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
  generated = {
      "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                                "clean_up_tokenization_spaces": False, **special},
      "special_tokens_map.json": special,
  }
  for fname, content in generated.items():
    source = os.path.join(os.path.dirname(tok.path), fname)
    if os.path.exists(source):
      shutil.copyfile(source, os.path.join(out, fname))
    else:
      _write_json(os.path.join(out, fname), {k: v for k, v in content.items() if v is not None})
  return ["tokenizer.json", *generated]


def previous_export(out: str) -> list[str]:
  """The entries of a previous export in `out` (replaced by the next one); refuses an `out` holding anything else."""
  if not os.path.lexists(out):
    return []
  if not os.path.isdir(out):
    raise ConfigError(f"--out={out} is a file, not a directory")
  names = sorted(os.listdir(out))
  foreign = [n for n in names if not (n.startswith(STAGING) or EXPORT_FILE.fullmatch(n) and
                                      os.path.isfile(os.path.join(out, n)))]
  if foreign:
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    raise ConfigError(f"--out={out} holds files that are not a HF export ({', '.join(foreign[:3])}{more}); nothing "
                      "was written: export into a new or empty directory (a previous export there is replaced whole)")
  return names


def _write_export(run: Run, out: str, max_shard_bytes: int, dtype: str | None) -> list[str]:
  tensors = {k: v.astype(jnp.dtype(dtype or v.dtype)) for k, v in to_hf(run.params, run.model_cfg).items()}
  files = write_weights(tensors, out, max_shard_bytes)
  _write_json(os.path.join(out, "config.json"), hf_config(run.model_cfg, run.tok.bos_id, run.tok.eos_id, dtype))
  generation = {"bos_token_id": run.tok.bos_id, "eos_token_id": run.tok.eos_id,
                "pad_token_id": run.tok.eos_id}  # no pad token: pad with EOS, as generate() would with a warning
  _write_json(os.path.join(out, "generation_config.json"), generation)
  return files + ["config.json", "generation_config.json", *write_tokenizer(run.tok, out, run.model_cfg.seq_len)]


def export(run: Run, out: str, max_shard_bytes: int = DEFAULT_MAX_SHARD, dtype: str | None = None) -> list[str]:
  """Writes run as a LlamaForCausalLM directory (weights cast to dtype, default the param dtype), replacing a
  previous export there; returns the files written."""
  check_exportable(run.model_cfg)
  old, created = previous_export(out), not os.path.lexists(out)
  os.makedirs(out, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=STAGING, dir=out)  # same filesystem: the moves below are renames
  try:
    files = _write_export(run, stage, max_shard_bytes, dtype)
    for name in old:  # the previous export goes whole: a stale model.safetensors beside new shards, or bf16
      path = os.path.join(out, name)  # weights under a float32 config, would be read by some tools
      if name in files:
        continue
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    for name in files:
      os.replace(os.path.join(stage, name), os.path.join(out, name))
  except BaseException:
    if created:
      shutil.rmtree(out, ignore_errors=True)
    raise
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return files


def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgParser(prog="python -m tinyjax.export", description=cli.summary(__doc__))
  parser.add_argument("workdir", help="a tinyjax run directory (holds checkpoints/)")
  parser.add_argument("--out", required=True, help="directory to write the HF checkpoint into (a previous export "
                      "there is replaced; other files there: refused)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--max_shard_size", default="5GB", help="split model.safetensors above this (e.g. 200MB)")
  parser.add_argument("--dtype", choices=config.DTYPES, default=None, help="weight dtype (default: as trained)")
  parser.add_argument("--cache_dir", default=None, help="where the run's tokenizer is (default: the run's "
                      "data.cache_dir)")
  args = parser.parse_args(argv)
  try:
    size = parse_size(args.max_shard_size)
    previous_export(args.out)  # before the checkpoint is read: a refused --out costs nothing
    run = load_run(args.workdir, args.step, args.cache_dir)
    files = export(run, args.out, size, args.dtype)
  except ConfigError as e:
    cli.fail(str(e))
  print(f"exported step {run.step} of {args.workdir} to {args.out}: {', '.join(files)}")


if __name__ == "__main__":
  main(sys.argv[1:])
