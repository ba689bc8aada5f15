"""plot: the Pareto front on a hand-made set, and every kind of figure written as a real (readable) PNG."""
import os

import matplotlib.image
import pytest

from tinyjax import plot


def test_pareto_front_hand_made():
  #        0    1    2    3    4    5    6
  xs = [1.0, 2.0, 3.0, 4.0, 5.0, 2.0, 0.5]
  ys = [5.0, 4.0, 4.5, 3.0, 3.5, 4.2, 6.0]
  # 6 (x .5: nothing smaller), 0 (5 < 6), 1 and 5 (x 2: 4, 4.2 < 5; tied x do not compete), 2 no (4.5 > 4),
  # 3 (3 < 4), 4 no (3.5 > 3).
  assert plot.pareto_front(xs, ys) == [6, 0, 1, 5, 3]
  assert plot.pareto_front([], []) == []
  assert plot.pareto_front([3.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == [1, 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_workdir):
  root = tmp_path_factory.mktemp("runs")
  out = []
  for name, batch in (("muon", 8), ("muon", 16), ("adamw", 8), ("adamw", 32)):
    def edit(cfg, name=name, batch=batch):
      cfg.optimizer.name, cfg.train.train_batch_size = name, batch
    bpb = 2.0 + (0.1 if name == "adamw" else 0.0) + 0.01 * batch
    out.append(make_workdir(root / f"{name}_b{batch}", "tiny", edit=edit, evals={"python_docs": [bpb + 0.3, bpb]}))
  out.append(make_workdir(root / "c4", "tiny", evals={"paloma/c4_en": [2.4, 2.2], "python_docs": [2.0, 1.8]}))
  return out


def _check_png(path, min_kb=15):
  assert os.path.getsize(path) > min_kb * 1024
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


@pytest.mark.parametrize("kind, extra", [
    ("curves", {"axis": "steps"}), ("curves", {"axis": "flops"}), ("batch", {"group_by": "optimizer.name"}),
    ("flops", {"leaderboard": ["runs.json"]}), ("flops", {"leaderboard": ["runs.json"], "flops_axis": "hardware"}),
    ("batch", {"group_by": "optimizer.name,train.train_batch_size"}), ("scaling", {"group_by": "model_size"}),
    ("scaling", {"axis": "tokens", "group_by": "optimizer.name"}),
])
def test_every_kind_writes_a_png(runs, tmp_path, marin, kind, extra):
  extra = {k: [marin.runs] if k == "leaderboard" else v for k, v in extra.items()}  # Marin's leaderboard table
  if extra.get("flops_axis") == "hardware":
    with pytest.raises(ValueError, match="nothing to plot"):  # CPU runs have no hardware FLOPs and no Marin rows
      plot.plot(runs, str(tmp_path / "x.png"), kind, flops_axis="hardware")
  out = plot.plot(runs, str(tmp_path / f"{kind}.png"), kind, **extra)
  _check_png(out)


def test_cli(runs, tmp_path, capsys):
  out = str(tmp_path / "b.png")
  plot.main(runs + ["--out", out, "--kind", "batch", "--group-by", "model_size"])
  assert capsys.readouterr().out.strip() == out
  _check_png(out)
  with pytest.raises(SystemExit) as e:
    plot.main(runs[:1] + ["--out", out, "--kind", "batch", "--group-by", "optimizer.nope"])
  assert e.value.code == 2 and "no config or results key 'optimizer.nope'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    plot.main(runs[:1] + ["--out", out, "--kind", "flops", "--leaderboard", str(tmp_path / "none.json")])
  assert capsys.readouterr().err.strip().endswith("none.json: no such file or directory")


def test_sweep_figures_group_lines_and_fall_back_to_loss(runs, tmp_path, make_workdir):
  loaded = [plot.Run(w) for w in runs[:4]]
  assert [plot._group_label(r, "optimizer.name,train.train_batch_size") for r in loaded] == [
      "name=muon, train_batch_size=8", "name=muon, train_batch_size=16", "name=adamw, train_batch_size=8",
      "name=adamw, train_batch_size=32"]
  y_of, label = plot._metric(loaded)
  assert label == "final BPB (python_docs)" and y_of(loaded[0]) == pytest.approx(2.08)
  no_eval = plot.Run(make_workdir(tmp_path / "no_eval", "tiny", evals={}))
  y_of, label = plot._metric(loaded + [no_eval])
  assert label == "final train loss (nats/token)" and y_of(no_eval) == pytest.approx(4.0)  # make_workdir's last loss
  _check_png(plot.plot(runs[:4] + [no_eval.workdir], str(tmp_path / "s.png"), "scaling", axis="tokens"))


def test_dynamics_figure_draws_every_matching_key(tmp_path):
  import json  # noqa: PLC0415
  with open(tmp_path / "dynamics.jsonl", "w") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "attention/layers_0/head_0/logit_max": step / 10,
                          "attention/layers_1/head_0/logit_max": step / 5, "logits/logz_max": 9.0}) + "\n")
  out = plot.plot([str(tmp_path)], str(tmp_path / "d.png"), kind="dynamics")
  assert matplotlib.image.imread(out).shape[0] > 100
  fig_lines = plot.plt.figure()
  ax = fig_lines.gca()
  plot.plot_dynamics([str(tmp_path)], "attention/*/logit_max", ax)
  assert sorted(line.get_label() for line in ax.get_lines()) == ["attention/layers_0/head_0/logit_max",
                                                                 "attention/layers_1/head_0/logit_max"]
  assert list(ax.get_lines()[1].get_ydata()) == [2.0, 4.0, 6.0]
  with pytest.raises(ValueError, match="matches no dynamics key"):
    plot.plot_dynamics([str(tmp_path)], "nope/*", ax)


def test_lr_figure_from_a_stability_root(tmp_path):
  import json  # noqa: PLC0415

  from tinyjax import stability  # noqa: PLC0415
  records = [{"setting": "use_qk_norm=False", "lr": lr, "initial_loss": 6.7, "final_loss": loss,
              "status": "diverged" if div else "completed",
              "divergence": {"step": 24, "quantity": "loss blow-up"} if div else None}
             for lr, loss, div in ((1e-3, 5.0, False), (1e-2, 4.1, False), (1.0, 6.7, True))]
  with open(tmp_path / (stability.SUMMARY + ".json"), "w") as f:
    json.dump(stability.summarize(records), f)
  out = plot.plot([str(tmp_path)], str(tmp_path / "lr.png"), kind="lr")
  assert matplotlib.image.imread(out).shape[0] > 100
  with pytest.raises(ValueError, match="not found"):
    plot.plot([str(tmp_path / "nope")], str(tmp_path / "x.png"), kind="lr")
