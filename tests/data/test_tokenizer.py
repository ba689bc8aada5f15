"""tinyjax/data/tokenizer.py: the per-token byte table (bits-per-byte) follows Levanter's rule exactly."""
import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tinyjax.data import tokenizer as tokenizers


def test_byte_table_equals_levanters_rule_through_transformers(tmp_path):
  """Levanter's byte_length_of_token, run with transformers on an offline tokenizer whose tokenizer_config.json has
  clean_up_tokenization_spaces=true and which has added special tokens beyond BOS/EOS (like Llama-3's <|eot_id|>):
  0 only for all_special_ids, else len(decode([id('.'), id]).utf8) - 1 under transformers' decode rules."""
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' installs transformers")
  bos, eos, extra = "<|begin_of_text|>", "<|end_of_text|>", ["<|eot_id|>", "<|reserved_special_token_0|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  text = ["It is here . Is it ? Yes ! No , it isn't . I'm sure it's done , we've seen they're here ."] * 50
  tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=[bos, eos],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
  tok.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    # transformers >= 5 skips the clean-up for BPE tokenizers unless forced; Levanter ran transformers 4.x, which
    # applied it (Marin's Llama-3 BPB counts ' .' as 1 byte), so the reference is forced to the 4.x behaviour.
    json.dump({"bos_token": bos, "eos_token": eos, "clean_up_tokenization_spaces": True,
               "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True,
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  dot = hf.encode(".", add_special_tokens=False)[0]
  levanter = [0 if i in hf.all_special_ids else len(hf.decode([dot, i]).encode("utf-8")) - 1 for i in range(len(hf))]
  loaded = tokenizers.load(str(tmp_path), str(tmp_path / "cache"), [], len(hf))
  ours = tokenizers.byte_lengths(loaded.tokenizer, len(hf), loaded.special_ids, loaded.clean_up_spaces)
  np.testing.assert_array_equal(ours, levanter)
  eot = tok.token_to_id("<|eot_id|>")
  assert ours[eot] == len("<|eot_id|>") and ours[tok.token_to_id(bos)] == 0, "only all_special_ids count 0"
  space_dot = tok.token_to_id("Ġ.")
  assert space_dot is not None and ours[space_dot] == 1, "clean_up_tokenization_spaces: ' .' decodes to 1 byte"
