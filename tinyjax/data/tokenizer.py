"""Tokenizers (HF `tokenizers`): train the built-in byte-level BPE, load a tokenizer.json or hub name, encode
documents exactly as Levanter's BatchTokenizer does, and Marin's per-token byte lengths for bits-per-byte.

cfg.data.tokenizer:
  "builtin"             byte-level BPE trained on cfg.data.train_urls with cfg.model.vocab_size ids (BOS=0, EOS=1;
                        a post-processor adds BOS, as Llama-3's does), saved to
                        <cache_dir>/tokenizers/<key>/tokenizer.json, key = hash(train sources, vocab size, version)
  a path                a tokenizer.json, or a directory holding one (and optionally tokenizer_config.json)
  anything else         a HF hub name: tokenizer.json + tokenizer_config.json downloaded once (huggingface_hub) to
                        <cache_dir>/tokenizers/hub/<name>/, so later runs are offline

Encoding (Levanter data/text.py BatchTokenizer, enforce_bos=enforce_eos=True): probe tokenizer("hi there") with the
tokenizer's own special tokens; if it does not end in EOS, each document becomes TEXT + " " + eos_token (EOS appended
as text, so a space token precedes it); if it does not start with BOS, bos_token + " " + TEXT. Then the whole string is
encoded with add_special_tokens=True. For the Llama-3 / marin tokenizer that is [BOS] text " " [EOS], BOS coming from
the post-processor. Tokenizers with a Replace/Sequence normalizer have texts over 10,000 chars encoded in pieces cut at
whitespace (Levanter's LONG_STRING_WORKAROUND).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tinyjax.errors import ConfigError
from tinyjax.data import corpus
from tinyjax.runtime import files

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# Names other tokenizers use, tried in order when tokenizer_config.json does not say.
_BOS_NAMES = (BOS, "<s>", "<bos>")
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<eos>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]+)>")
BUILTIN_VERSION = 2  # 2: BOS from a post-processor, so documents encode as Levanter encodes Llama-3's
LONG_STRING_WORKAROUND = 10_000  # Levanter: chars per piece for tokenizers with a Replace/Sequence normalizer
_WS = re.compile(r"\s")
HUB_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Names whose tokenizers give identical ids (a Levanter ledger records only the name). Marin: marin-tokenizer is the
# Llama-3 tokenizer with a chat template (experiments/marin_models.py); its fineweb-edu caches were built with
# meta-llama/Meta-Llama-3.1-8B (experiments/exp524_tokenizers.py).
SAME_IDS = (frozenset({"stanford-crfm/marin-tokenizer", "marin-community/marin-tokenizer",
                       "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3-8B"}),)


def same_tokenizer(a: str, b: str) -> bool:
  return a == b or any(a in group and b in group for group in SAME_IDS)


@dataclasses.dataclass(frozen=True)
class Loaded:
  tokenizer: Tokenizer
  path: str  # the tokenizer.json in use
  name: str  # cfg.data.tokenizer as given ("builtin", a path, or a hub name)
  sha256: str  # of the tokenizer.json bytes: with name, the tokenizer's identity in cache keys and ledgers
  bos_id: int | None
  eos_id: int
  bos_token: str | None
  eos_token: str
  append_bos: bool  # Levanter BatchTokenizer._need_to_add_bos: the tokenizer does not add BOS itself
  append_eos: bool  # Levanter _need_to_add_eos
  split_long: bool  # Levanter _needs_long_sequence_workaround
  special_ids: frozenset = frozenset()  # HF all_special_ids (decode_rules): tokens that count 0 bytes
  clean_up_spaces: bool = False  # tokenizer_config.json clean_up_tokenization_spaces (decode rule)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each document as int32 ids, exactly as Levanter's BatchTokenizer encodes it (module docstring)."""
    if self.append_bos:
      texts = [f"{self.bos_token} {t}" for t in texts]
    if self.append_eos:
      texts = [f"{t} {self.eos_token}" for t in texts]
    if not self.split_long or all(len(t) <= LONG_STRING_WORKAROUND for t in texts):
      return [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
    pieces, owner = [], []
    for i, t in enumerate(texts):
      while len(t) > LONG_STRING_WORKAROUND:
        m = _WS.search(t, LONG_STRING_WORKAROUND)
        cut = m.start() if m else len(t)
        pieces.append(t[:cut])
        owner.append(i)
        t = t[cut:]
      pieces.append(t)
      owner.append(i)
    out = [[] for _ in texts]
    # Each piece is encoded with special tokens and the pieces concatenated as-is: Levanter's _merge_split_encodings.
    for i, e in zip(owner, self.tokenizer.encode_batch(pieces, add_special_tokens=True)):
      out[i].extend(e.ids)
    return [np.asarray(ids, np.int32) for ids in out]


def _atomic_write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.atomic_write(path, text)


def train_bpe(train_urls, vocab_size: int) -> Tokenizer:
  """GPT-2-style byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = (doc for url in train_urls for doc in corpus.documents(url))
  tok.train_from_iterator(texts, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])  # as Llama-3
  return tok


def _builtin_path(root: str, train_urls, vocab_size: int) -> str:
  ident = json.dumps({"sources": [corpus.source_id(u) for u in train_urls], "vocab_size": vocab_size,
                      "version": BUILTIN_VERSION})
  key = hashlib.sha256(ident.encode()).hexdigest()[:12]
  return os.path.join(root, "tokenizers", f"bpe{vocab_size}-{key}", "tokenizer.json")


def _special_token(tok: Tokenizer, folder: str, field: str, names) -> str | None:
  """The BOS/EOS token: tokenizer_config.json's (or special_tokens_map.json's) `field`, else the first known name."""
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(folder, fname)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        value = json.load(f).get(field)
      value = value.get("content") if isinstance(value, dict) else value
      if value is not None and tok.token_to_id(value) is not None:
        return value
  return next((n for n in names if tok.token_to_id(n) is not None), None)


def _from_hub(spec: str, root: str) -> str:
  """Downloads a hub tokenizer's files once; returns the saved tokenizer.json."""
  folder = os.path.join(root, "tokenizers", "hub", spec.replace("/", "--"))
  path = os.path.join(folder, "tokenizer.json")
  if os.path.exists(path):
    return path
  from huggingface_hub import hf_hub_download  # noqa: PLC0415
  from huggingface_hub.errors import EntryNotFoundError  # noqa: PLC0415
  from huggingface_hub.utils import logging as hf_logging  # noqa: PLC0415
  hf_logging.set_verbosity_error()  # offline, its retry warnings were 22 lines before our one-line error
  os.makedirs(folder, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=folder, prefix=".download-")
  try:
    for fname in HUB_FILES:
      try:
        hf_hub_download(spec, fname, local_dir=tmp)
      except EntryNotFoundError:
        if fname == "tokenizer.json":
          raise
    for fname in sorted(HUB_FILES, key=lambda f: f == "tokenizer.json"):  # last: it marks a complete download
      if os.path.exists(os.path.join(tmp, fname)):
        os.replace(os.path.join(tmp, fname), os.path.join(folder, fname))
  except Exception as e:  # no network, unknown or gated repo: one clear line
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConfigError(f"config.data.tokenizer={spec!r}: not 'builtin', not an existing path, and downloading it "
                      f"from the HF hub failed ({type(e).__name__}: {first})") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


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
  else:
    path = _from_hub(spec, root)
  with open(path, "rb") as f:
    raw = f.read()
  tok = Tokenizer.from_str(raw.decode("utf-8"))
  folder = os.path.dirname(path)
  bos = _special_token(tok, folder, "bos_token", _BOS_NAMES)
  eos = _special_token(tok, folder, "eos_token", _EOS_NAMES)
  if eos is None:
    raise ConfigError(f"config.data.tokenizer={spec!r}: no end-of-text token (tried {', '.join(_EOS_NAMES)})")
  bos_id, eos_id = (tok.token_to_id(bos) if bos else None), tok.token_to_id(eos)
  probe = tok.encode("hi there", add_special_tokens=True).ids  # Levanter's probe
  split_long = isinstance(tok.normalizer, (normalizers.Replace, normalizers.Sequence))
  special_ids, clean_up = decode_rules(tok, folder, bos_id, eos_id)
  return Loaded(tok, path, spec, hashlib.sha256(raw).hexdigest(), bos_id, eos_id, bos, eos,
                append_bos=bos_id is not None and probe[:1] != [bos_id], append_eos=probe[-1:] != [eos_id],
                split_long=split_long, special_ids=frozenset(special_ids), clean_up_spaces=clean_up)


# transformers' clean_up_tokenization (applied by decode when tokenizer_config.json's clean_up_tokenization_spaces is
# true, as for Llama-3 / marin-tokenizer): these replacements, in this order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_SPECIAL_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def decode_rules(tok: Tokenizer, folder: str, bos_id: int | None, eos_id: int) -> tuple[set[int], bool]:
  """(all_special_ids, clean_up_tokenization_spaces) as a HF tokenizer loaded from `folder` has them: the ids of
  the special-token fields and additional_special_tokens of tokenizer_config.json / special_tokens_map.json (not
  every added token: Llama-3's <|eot_id|> is added but not special there); without those files, BOS and EOS."""
  ids, clean_up, found = set(), False, False
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, fname)
    if not os.path.exists(path):
      continue
    found = True
    with open(path, encoding="utf-8") as f:
      conf = json.load(f)
    clean_up = bool(conf.get("clean_up_tokenization_spaces", clean_up))
    values = [conf.get(k) for k in _SPECIAL_FIELDS] + list(conf.get("additional_special_tokens") or [])
    for v in values:
      v = v.get("content") if isinstance(v, dict) else v
      if isinstance(v, str) and tok.token_to_id(v) is not None:
        ids.add(tok.token_to_id(v))
  if not found:
    ids = {i for i in (bos_id, eos_id) if i is not None}
  return ids, clean_up


def byte_lengths(tok: Tokenizer, size: int, special_ids=None, clean_up: bool = False) -> np.ndarray:
  """int32[size] UTF-8 bytes per id, as Levanter's hf_utils.byte_length_of_token computes them with a HF tokenizer:
  all_special_ids 0; <0xNN> byte tokens their byte count; others len(decode([id('.'), id])) - 1 with the
  tokenizer's decode rules (clean_up_tokenization_spaces included; the '.' keeps a leading space); ids >= the
  tokenizer's size 0. special_ids=None: every added token marked special (the tokenizer.json view)."""
  n = min(size, tok.get_vocab_size(with_added_tokens=True))
  if special_ids is None:
    special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
  dot = tok.encode(".", add_special_tokens=False).ids[0]
  decoded = tok.decode_batch([[dot, i] for i in range(n)], skip_special_tokens=False)
  out = np.zeros(size, np.int32)
  for i, text in enumerate(decoded):
    piece = tok.id_to_token(i)
    if i in special_ids or piece is None:
      continue
    m = _BYTE_TOKEN.match(piece)
    if m:
      out[i] = len(bytes.fromhex(m.group(1)))
      continue
    if clean_up:
      for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    out[i] = len(text.encode("utf-8")) - 1
  return out
