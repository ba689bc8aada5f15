"""compare: every leaderboard format loads, neighbours are the right Marin rows, non-Paloma runs are flagged,
malformed leaderboard files are one clear error naming the file, and with no --leaderboard the published table is
used when it answers and the bundled snapshot when it does not (a local server and a closed local port stand in for
the network: no test reaches outside this machine)."""
import functools
import http.server
import json
import os
import socket
import threading

import pytest

from tinyjax import compare, reference
from tinyjax.runtime import results


@pytest.fixture(scope="module")
def run_50m(tmp_path_factory, make_workdir):
  """configs/c4_50m.py with a final Paloma c4_en BPB of 1.40 (on a CPU: hardware FLOPs unknown)."""
  return make_workdir(tmp_path_factory.mktemp("w") / "c4_50m", "c4_50m", evals={"paloma/c4_en": [1.45, 1.40]})


@pytest.fixture(scope="module")
def run_tiny(tmp_path_factory, make_workdir):
  return make_workdir(tmp_path_factory.mktemp("w") / "tiny", "tiny", evals={"python_docs": [2.3, 1.9]})


@pytest.fixture(scope="module")
def published(marin, tmp_path_factory) -> str:
  """The table as marin-community/speedrun publishes it (a bare list of rows), from the bundled snapshot."""
  path = tmp_path_factory.mktemp("published") / "runs.json"
  path.write_text(json.dumps(reference.load(marin.runs)["runs"]))
  return str(path)


def test_every_format_loads(marin, published):
  table = compare.load_leaderboard([published])
  assert len(table) == 96 and all(r["total_tokens"] is None for r in table)  # runs.json has no token counts
  assert compare.load_leaderboard([marin.runs]) == table  # the bundled snapshot: the same rows under "runs"
  enriched = compare.load_leaderboard([marin.leaderboard])
  assert len(enriched) == 137
  h200 = next(r for r in enriched if r["run_name"] == "llama_50m_h200")
  assert (h200["total_tokens"], h200["hardware"], h200["training_time"]) == (996_147_200, "1x H200", 1556.5628195246245)
  [one] = compare.load_leaderboard([marin.speedrun_50m])
  assert one == {"run_name": "llama_50m_muon_1x", "model_size": 50_874_048, "model_flops": 1.6698528441040896e17,
                 "bpb": 1.398867130279541, "training_hardware_flops": 1.1666472839337308e18,
                 "training_time": 1179.0270681492984, "total_tokens": 999_948_288, "num_chips": 1,
                 "hardware": "1x H200", "device_flops": 989.5e12, "train_batch_size": 128, "seq_len": 1024,
                 "num_train_steps": 7629, "flags": []}
  assert not any(r["flags"] for r in table + enriched), "the shipped tables are consistent"


def test_directory_of_per_run_files(marin, tmp_path):
  with open(marin.speedrun_50m) as f:
    doc = json.load(f)
  for name in ("speedrun/a", "speedrun/b/c"):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / results.RESULTS_FILE, "w") as f:
      json.dump(doc, f)
  rows = compare.load_leaderboard([str(tmp_path / "speedrun")])
  assert [r["run_name"] for r in rows] == ["a", "b/c"]  # Marin's run_name: the folder under the searched root


def test_50m_neighbours_in_runs_json(marin, run_50m):
  [c] = compare.compare([run_50m], compare.load_leaderboard([marin.runs]), near=3)
  got = [(r["run_name"], r["match"]) for r in c["neighbours"]]
  # By hand: ours 1.66985e17; llama_50m_gpu/h200 and olmo_50m_h200 are at 1.66351e17 (log10 distance 0.00165,
  # ties by name), llama_30m next at 8.70e16 (0.283); llama_50m_10xC (1.75e18, 1.020) is in by model size only.
  assert got == [("llama_50m_gpu", "size+flops"), ("llama_50m_h200", "size+flops"), ("olmo_50m_h200", "flops"),
                 ("llama_50m_10xC", "size")]
  gpu = c["neighbours"][0]
  assert gpu["delta_bpb"] == pytest.approx(1.40 - 1.4032597541809082)
  assert gpu["flops_ratio"] == pytest.approx(1.6698528441040896e17 / 1.66350525825024e17)
  assert c["run"]["comparable"] and c["run"]["eval_set"] == "paloma/c4_en"


def test_50m_neighbours_in_enriched_leaderboard(marin, run_50m):
  [c] = compare.compare([run_50m], compare.load_leaderboard([marin.leaderboard]), near=1)
  assert [(r["run_name"], r["match"]) for r in c["neighbours"]] == [
      ("llama_50m_muon_1x", "size+flops"), ("llama_50m_gpu", "size"), ("llama_50m_h200", "size"),
      ("llama_50m_10xC", "size")]
  assert c["neighbours"][0]["delta_bpb"] == pytest.approx(1.40 - 1.398867130279541)
  assert c["neighbours"][0]["flops_ratio"] == 1.0


def test_nearest_in_flops_on_a_hand_made_board(run_50m):
  flops = {"e15": 1e15, "e16x3": 3e16, "e17": 1.6698528441040896e17, "e17x2": 4e17, "e19": 1e19}
  board = [{"run_name": k, "model_size": 1, "model_flops": v, "bpb": 1.5, "training_hardware_flops": None,
            "training_time": None, "total_tokens": None, "num_chips": None, "hardware": None} for k, v in flops.items()]
  # log10 distances from ours: e17 0, e17x2 0.380, e16x3 0.746, e19 1.777, e15 2.223
  for near, names in ((0, []), (2, ["e17", "e17x2"]), (4, ["e17", "e17x2", "e16x3", "e19"])):
    [c] = compare.compare([run_50m], board, near)
    assert [r["run_name"] for r in c["neighbours"]] == names


def test_non_paloma_eval_is_flagged(marin, run_tiny, capsys):
  [c] = compare.compare([run_tiny], compare.load_leaderboard([marin.runs]), near=2)
  assert not c["run"]["comparable"] and c["run"]["eval_set"] == "python_docs" and c["run"]["bpb"] == 1.9
  assert len(c["neighbours"]) == 2 and all(r["delta_bpb"] is None for r in c["neighbours"])
  compare.main([run_tiny, "--leaderboard", marin.runs, "--near", "2"])
  out = capsys.readouterr().out
  assert "1.9000*" in out
  assert "tiny: BPB is on python_docs, not paloma/c4_en: not comparable with the leaderboard (no ΔBPB)" in out


def test_cli_table_and_json(marin, run_50m, run_tiny, capsys):
  compare.main([run_50m, run_tiny, "--leaderboard", marin.runs, "--leaderboard", marin.speedrun_50m, "--near", "1",
                "--json"])
  doc = json.loads(capsys.readouterr().out)
  assert doc["leaderboard_runs"] == 97
  assert [c["run"]["run_name"] for c in doc["comparisons"]] == ["c4_50m", "tiny"]
  assert doc["comparisons"][0]["neighbours"][0]["run_name"] == "llama_50m_muon_1x"
  compare.main([run_50m, "--leaderboard", marin.speedrun_50m])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[:5] == ["run", "match", "params", "c4_en", "BPB"]
  assert lines[2].split()[:6] == ["c4_50m", "ours", "50.9M", "1.4000", "-", "1.67e+17"]
  assert lines[3].split()[:6] == ["llama_50m_muon_1x", "size+flops", "50.9M", "1.3989", "+0.0011", "1.67e+17"]


@pytest.fixture
def local_table(published):
  """An HTTP server on 127.0.0.1 serving the published table's bytes; yields its URL."""
  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the default writes each request to stderr, where compare's line goes
      pass
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                           functools.partial(Quiet, directory=os.path.dirname(published)))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}/runs.json"
  server.shutdown()
  server.server_close()


def _closed_port_url() -> str:
  with socket.socket() as s:  # bound then closed: nothing listens there, the connection is refused at once
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}/runs.json"


def test_default_is_the_published_table(local_table, run_50m, monkeypatch, capsys):
  monkeypatch.setattr(compare, "DEFAULT_URL", local_table)
  compare.main([run_50m, "--near", "3"])
  out, err = capsys.readouterr()
  assert err == f"leaderboard: the published table {local_table} (96 runs)\n"
  assert [line.split()[0] for line in out.splitlines()[3:7]] == [
      "llama_50m_gpu", "llama_50m_h200", "olmo_50m_h200", "llama_50m_10xC"]


def test_offline_uses_the_bundled_snapshot(run_50m, monkeypatch, capsys):
  url = _closed_port_url()
  monkeypatch.setattr(compare, "DEFAULT_URL", url)
  compare.main([run_50m, "--near", "3"])
  out, err = capsys.readouterr()
  assert err.startswith(f"leaderboard: {url} not used (cannot fetch (<urlopen error [Errno 111] Connection refused>))")
  assert err.endswith("; the bundled snapshot marin-community/speedrun data/runs.json @ dd1d1c17 (2025-12-21, "
                      "96 runs)\n") and err.count("\n") == 1
  assert [line.split()[0] for line in out.splitlines()[3:7]] == [
      "llama_50m_gpu", "llama_50m_h200", "olmo_50m_h200", "llama_50m_10xC"], "the same rows as the published table"
  compare.main([run_50m, "--json"])
  doc = json.loads(capsys.readouterr().out)
  assert doc["leaderboard_runs"] == 96 and doc["leaderboard"][0].endswith("(2025-12-21, 96 runs)")


def test_a_page_that_is_not_the_table_falls_back_too(tmp_path, run_50m, monkeypatch, capsys):
  """A captive portal or an error page answers 200 with HTML: not the table, so the snapshot is used."""
  (tmp_path / "runs.json").write_text("<html>sign in</html>")
  monkeypatch.setattr(compare.urllib.request, "urlopen",
                      lambda url, timeout: open(tmp_path / "runs.json", "rb"))  # noqa: SIM115 - urlopen's contract
  compare.main([run_50m])
  assert "not used (Expecting value: line 1 column 1 (char 0)); the bundled snapshot" in capsys.readouterr().err


def test_an_explicit_url_does_not_fall_back(run_50m, capsys):
  url = _closed_port_url()
  with pytest.raises(SystemExit) as e:
    compare.main([run_50m, "--leaderboard", url])
  assert e.value.code == 2
  assert capsys.readouterr().err == (f"tinyjax: error: {url}: cannot fetch (<urlopen error [Errno 111] Connection "
                                     "refused>); pass --leaderboard FILE to work offline\n")


ROW = {"run_name": "r", "model_size": 5, "model_flops": 1e17, "eval_paloma_c4_en_bpb": 1.4}


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[]", "no runs"),
    ('{"runs": []}', "no runs"),
    ("42", "expected a list of runs (runs.json) or an object with a 'runs' list, got int"),
    ('{"rows": []}', "expected a list of runs (runs.json) or an object with a 'runs' list, got dict without 'runs'"),
    ("[1]", "runs[0]: expected an object, got int"),
    (json.dumps([{k: v for k, v in ROW.items() if k != "model_flops"}]), "runs[0] (r): missing field 'model_flops'"),
    (json.dumps([{**ROW, "model_size": "50M"}]), "runs[0] (r): field 'model_size' must be an integer, got str '50M'"),
    (json.dumps([ROW, {**ROW, "eval_paloma_c4_en_bpb": True}]),
     "runs[1] (r): field 'eval_paloma_c4_en_bpb' must be a number, got bool True"),
    (json.dumps([{**ROW, "model_flops": 0}]), "runs[0] (r): field 'model_flops' must be > 0, got 0"),
    (json.dumps({"runs": [{"run_info": {"model_size": 5, "model_flops": 1e17}}]}),
     "runs[0].run_info: missing field 'eval/paloma/c4_en/bpb'"),
])
def test_malformed_leaderboards(tmp_path, content, message):
  path = tmp_path / "board.json"
  path.write_text(content)
  with pytest.raises(compare.LeaderboardError) as e:
    compare.load_leaderboard([str(path)])
  assert str(e.value) == f"{path}: {message}"


def test_missing_sources_and_cli_error_line(tmp_path, run_50m, capsys):
  with pytest.raises(compare.LeaderboardError, match="no such file"):
    compare.load_leaderboard([str(tmp_path / "nope.json")])
  with pytest.raises(compare.LeaderboardError, match=f"no {results.RESULTS_FILE} files under this directory"):
    compare.load_leaderboard([str(tmp_path)])
  (tmp_path / "bad.json").write_text("[{}]")
  with pytest.raises(SystemExit) as e:
    compare.main([run_50m, "--leaderboard", str(tmp_path / "bad.json")])
  assert e.value.code == 2
  assert capsys.readouterr().err == f"tinyjax: error: {tmp_path / 'bad.json'}: runs[0]: missing field 'run_name'\n"


def _snapshot_row(marin, name: str) -> dict:
  with open(marin.leaderboard) as f:
    return dict(next(r for r in json.load(f)["runs"] if r["run_name"] == name))


def _contradictory_board(marin, tmp_path) -> str:
  """Rows as Marin's history had them, next to one left as shipped."""
  # Issue #1767: a training time summed from sampled W&B history, and hardware FLOPs computed from it.
  gpu = {**_snapshot_row(marin, "llama_50m_gpu"), "training_time_s": 72.0,
         "training_hardware_flops": 72.0 * 4 * 312e12}
  v5p = {**_snapshot_row(marin, "adamw_llama_scaling/130m"), "num_chips": 32}  # before PR #1756
  v5p_flops = {**_snapshot_row(marin, "muon_llama_scaling/130m"), "num_chips": None}
  v5p_flops["training_hardware_flops"] = v5p_flops["training_time_s"] * 32 * 459e12  # counted as 32 chips
  tokens = {**_snapshot_row(marin, "llama_50m_h200"), "num_train_steps": 7000}
  below = {k: v for k, v in _snapshot_row(marin, "olmo_50m_h200").items()
           if k not in ("training_time_s", "hardware")}
  below["training_hardware_flops"] = below["model_flops"] / 2
  path = tmp_path / "board.json"
  ours = _snapshot_row(marin, "llama_50m_muon_1x")
  path.write_text(json.dumps({"runs": [gpu, v5p, v5p_flops, tokens, below, ours]}))
  return str(path)


def test_contradictory_rows_are_flagged(marin, tmp_path):
  rows = {r["run_name"]: r["flags"] for r in compare.load_leaderboard([_contradictory_board(marin, tmp_path)])}
  # 1.66350525825024e17 / (72 s x 4 chips x 312e12) = 1.851
  assert rows["llama_50m_gpu"] == ["implied MFU 185% > 100%: model FLOPs 1.66e+17 in 72 s on 4 chips of 312 TFLOP/s"]
  assert rows["adamw_llama_scaling/130m"] == [
      "num_chips 32, but TPU v5p-32 is 16 chips",
      "training_hardware_flops = training_time x 16 chips x peak, not 32 chips"]
  assert rows["muon_llama_scaling/130m"] == [
      "training_hardware_flops = training_time x 32 chips x peak, not 16 chips"]
  assert rows["llama_50m_h200"] == ["total_tokens 996,147,200 != train_batch_size x seq_len x num_train_steps = "
                                    "128 x 1024 x 7000 = 917,504,000"]
  assert rows["olmo_50m_h200"] == ["training_hardware_flops 8.32e+16 < model_flops 1.66e+17"]
  assert rows["llama_50m_muon_1x"] == []
  assert [compare.named_chips(h) for h in ("TPU v5p-32", "v4-128", "TPU v5litepod-64 (v5e)", "v6e-8", "8x H200",
                                           "1x GPU (variant 'auto' -> H100 flops table)", "CPU", None)] == [
      16, 64, 64, 8, 8, 1, None, None]


def test_flags_in_the_table_and_json(marin, tmp_path, run_50m, capsys):
  board = _contradictory_board(marin, tmp_path)
  compare.main([run_50m, "--leaderboard", board, "--near", "2"])
  out = capsys.readouterr().out.splitlines()
  names = [line.split()[0] for line in out[2:6]]
  assert names == ["c4_50m", "llama_50m_muon_1x", "llama_50m_gpu!", "llama_50m_h200!"]
  assert "! llama_50m_gpu: implied MFU 185% > 100%: model FLOPs 1.66e+17 in 72 s on 4 chips of 312 TFLOP/s" in out
  assert ("! 5 of 6 leaderboard rows have figures that contradict each other (--json lists them): llama_50m_gpu, "
          "adamw_llama_scaling/130m, muon_llama_scaling/130m, llama_50m_h200, olmo_50m_h200") in out
  compare.main([run_50m, "--leaderboard", board, "--near", "2", "--json"])
  doc = json.loads(capsys.readouterr().out)
  assert [r["run_name"] for r in doc["flagged_rows"]] == ["llama_50m_gpu", "adamw_llama_scaling/130m",
                                                          "muon_llama_scaling/130m", "llama_50m_h200", "olmo_50m_h200"]
  gpu = next(r for r in doc["comparisons"][0]["neighbours"] if r["run_name"] == "llama_50m_gpu")
  assert gpu["flags"][0].startswith("implied MFU 185%") and gpu["delta_bpb"] is not None  # flagged, still listed
