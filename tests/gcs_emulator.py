"""Test stand-in for Cloud Storage: gcp-storage-emulator on 127.0.0.1, in memory.

python tests/gcs_emulator.py PORT

Two gaps between the emulator and real GCS matter to tensorstore, and this launcher fills them in the emulator's
download handler (nothing else is changed): real GCS sends an object's generation as `x-goog-generation` with every
download (Orbax's OCDBT manifests need it), and it serves suffix ranges `bytes=-N` (tensorstore reads a sharded
zarr3 index from the end of the shard).
"""
import re
import sys
import threading

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_DOWNLOAD = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    obj = storage.get_file_obj(bucket, name)
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", None) or "")
    if suffix:  # the last N bytes -> the equivalent "start-" range the emulator understands
      start = max(len(storage.get_file(bucket, name)) - int(suffix.group(1)), 0)
      get_header = request.get_header
      request.get_header = lambda key, default=None: (f"bytes={start}-" if key.lower() == "range"
                                                      else get_header(key, default))
  except Exception:  # noqa: BLE001 - a missing object: the original handler answers 404
    pass
  return _DOWNLOAD(request, response, storage, *args, **kwargs)


def main(port: int) -> None:
  objects.download = _download_with_generation  # objects.get (?alt=media, what tensorstore uses) calls it too
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _DOWNLOAD:
        handlers[method] = _download_with_generation
  srv = server.create_server("127.0.0.1", port, in_memory=True)
  srv.start()
  print("ready", flush=True)
  threading.Event().wait()  # serve until killed


if __name__ == "__main__":
  main(int(sys.argv[1]))
