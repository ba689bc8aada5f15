"""Test helper: a Levanter JaggedArrayStore written directly with tensorstore (not through tinyjax.data.cache), with the
zarr3 spec of Levanter's jagged_array._get_spec, so tests can check that tinyjax reads caches Levanter wrote."""
import numpy as np
import tensorstore as ts


def _spec(path):
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "metadata": {
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [134217728]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [262144], "codecs": [{"name": "blosc", "configuration": {"clevel": 5}}]}}]}}


def write_levanter_store(path, docs, dtype="int32") -> np.ndarray:
  """Writes `docs` (token arrays) as path/input_ids/{offsets,data}; returns the flat token stream."""
  off = ts.open(_spec(f"{path}/input_ids/offsets"), create=True, dtype="int64", shape=[2**54]).result()
  dat = ts.open(_spec(f"{path}/input_ids/data"), create=True, dtype=dtype, shape=[2**54]).result()
  flat = np.concatenate(docs).astype(dtype)
  dat[:len(flat)].write(flat).result()
  off[1:len(docs) + 1].write(np.cumsum([len(d) for d in docs])).result()
  off[0].write(len(docs)).result()
  return flat
