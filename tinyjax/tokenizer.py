"""Tokenizers (HF `tokenizers`): train the built-in byte-level BPE, load a tokenizer.json or hub name, encode
documents as [BOS] + ids + [EOS], and Marin's per-token byte lengths for bits-per-byte.

cfg.data.tokenizer:
  "builtin"             byte-level BPE trained on cfg.data.train_urls with cfg.model.vocab_size ids (BOS=0, EOS=1),
                        saved to <cache_dir>/tokenizers/<key>/tokenizer.json, key = hash(train sources, vocab size)
  a path                a tokenizer.json, or a directory holding one (and optionally tokenizer_config.json)
  anything else         a HF hub name (Tokenizer.from_pretrained; needs the network), saved under the cache dir
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tinyjax import corpus
from tinyjax.config import ConfigError

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# Names other tokenizers use, tried in order when tokenizer_config.json does not say.
_BOS_NAMES = (BOS, "<s>", "<bos>")
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<eos>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]+)>")


@dataclasses.dataclass(frozen=True)
class Loaded:
  tokenizer: Tokenizer
  path: str  # the tokenizer.json in use
  name: str  # cfg.data.tokenizer as given ("builtin", a path, or a hub name)
  sha256: str  # of the tokenizer.json bytes: with name, the tokenizer's identity in cache keys and ledgers
  bos_id: int | None
  eos_id: int

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each text as int32 [BOS] + ids + [EOS] (Levanter BatchTokenizer with append_bos/append_eos)."""
    head = [] if self.bos_id is None else [self.bos_id]
    return [np.asarray(head + e.ids + [self.eos_id], np.int32)
            for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _atomic_write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def train_bpe(train_urls, vocab_size: int) -> Tokenizer:
  """GPT-2-style byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = (doc for url in train_urls for doc in corpus.documents(url))
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def _builtin_path(root: str, train_urls, vocab_size: int) -> str:
  ident = json.dumps({"sources": [corpus.source_id(u) for u in train_urls], "vocab_size": vocab_size})
  key = hashlib.sha256(ident.encode()).hexdigest()[:12]
  return os.path.join(root, "tokenizers", f"bpe{vocab_size}-{key}", "tokenizer.json")


def _special_id(tok: Tokenizer, config_path: str, field: str, names) -> int | None:
  """Id of the BOS/EOS token: tokenizer_config.json's `field` if present, else the first known name."""
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      value = json.load(f).get(field)
    value = value.get("content") if isinstance(value, dict) else value
    if value is not None and tok.token_to_id(value) is not None:
      return tok.token_to_id(value)
  return next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)


def load(spec: str, root: str, train_urls, vocab_size: int) -> Loaded:
  """cfg.data.tokenizer -> Loaded; `root` is the expanded cache dir. Trains/saves the builtin one on first use."""
  if spec == "builtin":
    path = _builtin_path(root, train_urls, vocab_size)
    if not os.path.exists(path):
      _atomic_write(path, train_bpe(train_urls, vocab_size).to_str(pretty=True))
  elif os.path.exists(os.path.expanduser(spec)):
    path = os.path.expanduser(spec)
    path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
      raise ConfigError(f"config.data.tokenizer={spec!r}: directory has no tokenizer.json")
  else:  # a hub name; the saved copy makes later runs offline
    path = os.path.join(root, "tokenizers", "hub", spec.replace("/", "--"), "tokenizer.json")
    if not os.path.exists(path):
      try:
        tok = Tokenizer.from_pretrained(spec)
      except Exception as e:  # tokenizers raises a bare Exception for unknown repos / no network
        raise ConfigError(f"config.data.tokenizer={spec!r}: not 'builtin', not an existing path, and loading it "
                          f"from the HF hub failed ({e})") from e
      _atomic_write(path, tok.to_str(pretty=True))
  with open(path, "rb") as f:
    raw = f.read()
  tok = Tokenizer.from_str(raw.decode("utf-8"))
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  bos = _special_id(tok, config_path, "bos_token", _BOS_NAMES)
  eos = _special_id(tok, config_path, "eos_token", _EOS_NAMES)
  if eos is None:
    raise ConfigError(f"config.data.tokenizer={spec!r}: no end-of-text token (tried {', '.join(_EOS_NAMES)})")
  return Loaded(tok, path, spec, hashlib.sha256(raw).hexdigest(), bos, eos)


def byte_lengths(tok: Tokenizer, size: int) -> np.ndarray:
  """int32[size] UTF-8 bytes per id (Levanter hf_utils.byte_length_of_token): special tokens 0, <0xNN> byte
  tokens their byte count, others len(decode([id('.'), id])) - 1 (the '.' keeps a leading space), ids >= the
  tokenizer's size 0."""
  n = min(size, tok.get_vocab_size(with_added_tokens=True))
  special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
  dot = tok.encode(".", add_special_tokens=False).ids[0]
  decoded = tok.decode_batch([[dot, i] for i in range(n)], skip_special_tokens=False)
  out = np.zeros(size, np.int32)
  for i, text in enumerate(decoded):
    piece = tok.id_to_token(i)
    if i in special or piece is None:
      continue
    m = _BYTE_TOKEN.match(piece)
    out[i] = len(bytes.fromhex(m.group(1))) if m else len(text.encode("utf-8")) - 1
  return out
