"""The data path: documents (corpus) -> token ids (tokenizer) -> Levanter-layout token caches (cache, builder) ->
batches of windows (loader). `python -m tinyjax.data` prepares them ahead of a run (__main__)."""
from tinyjax.data.loader import Dataset, eval_batches, num_eval_windows, prepare, train_batches  # noqa: F401
