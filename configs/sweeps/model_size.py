"""The paper's size grid: c4_30m / c4_50m / c4_75m x 0.25, 0.5, 1, 2, 4 x Chinchilla (15 points).

COMMAND:  python -m tinyjax.sweep configs/sweeps/model_size.py --launch tpu --root gs://BUCKET/sweeps/model_size \
            -- --name=tj-v4 --zone=us-central2-b --accelerator-type=v4-8 --repo=https://github.com/OWNER/tinyjax
REPORT:   python -m tinyjax.sweep configs/sweeps/model_size.py --report --root DIR  (report.csv, scaling.png)
The model-size axis changes the base config file itself, so it is the "config" key of each point (an override
"config" replaces the sweep's base config; it is not a --config.* flag).
"""


def get_sweep():
  return {
      "config": "configs/c4_50m.py",
      "axes": [
          [{"config": f"configs/c4_{size}.py"} for size in ("30m", "50m", "75m")],
          [{"train.chinchilla_multiple": m} for m in (0.25, 0.5, 1.0, 2.0, 4.0)],
      ],
      "figures": [{"kind": "scaling", "group_by": "model_size", "x": "chinchilla"}],
  }
