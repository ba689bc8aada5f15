"""Faults at random moments, then the run's end compared with an uninterrupted run's: are they the same run?

python -m tinyjax.benchmarks.chaos --trials N [--seed S] [--processes 1|2] [--steps 16] [--root DIR]

Runs a small config (configs/tiny.py at d 32, 2 layers, vocab 512, seq 32, batch 8: `--steps` steps, a checkpoint every
4, an eval every 8) once uninterrupted, then N trials: each starts the same run and hits it 1-3 times, at moments drawn
from the seed (during setup, after a random step, while a checkpoint is written, during an eval, right after the
final checkpoint), with SIGKILL, SIGTERM, SIGHUP or a disk that fills (the trial's workdir is a tmpfs, filled up to
its last byte; skipped, and said so, where no tmpfs can be mounted), and reruns the same command after each until it
completes. With two processes (a 2-task SLURM step on this machine, CPU collectives) a signal goes to one of them, and
SIGKILL to its supervisor (the host gone) or to its trainer (the kernel's OOM killer).

A trial is identical when the final param_sha256, every logged loss and eval, run_info.json and
speedrun_results.json (fields that measure time, name the process or the directory aside) equal the uninterrupted
run's; metrics.jsonl has no torn rows and no duplicate rows; no tmp, half-deleted or moved-aside folder is left; and
every start ended as documented (its exit code for the fault; on stderr at most one line per process, tinyjax's, and
nothing else). The last lines: `chaos: K/N identical`, then what differed for each trial that was not.
Exit code 0 when all are identical, 1 otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tinyjax import cli
from tinyjax.runtime import workdir as workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVAL_EVERY, SAVE_EVERY = 8, 4
RUN_TIMEOUT_S = 300  # one start of the run, faults included (a 2-process restart measured ~20 s on 2 busy cores)
MAX_STARTS = 10  # per trial: its faults and the restarts after them
DISK_MB = 64  # each trial's tmpfs: the run needs ~17 MB (two 8 MB checkpoints and the records)
# No strike in a start's first 0.3 s: a signal before the interpreter runs tinyjax's first line (measured: up to
# ~50 ms after exec on the idle machine, more on a loaded one) meets the default action, as in any Python program.
FIRST_S = 0.3
MOMENTS = ("setup", "step", "save", "eval", "final")
# Fields that measure time, name the run's process, host, command line or directory, or the source tree's state.
TIMED = ("time", "second", "argv", "workdir", "mfu", "per_s", "eta", "hour", "date", "duration", "host", "pid", "git")
TRACE = re.compile(r"Traceback|Fatal Python error|^\*\*\* |^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)
# What a run hit by each fault may end with (per process); 0: the fault came after the run's last write.
EXPECTED = {"SIGKILL": {-9, 137, 4, 0}, "SIGTERM": {75, 0}, "SIGHUP": {75, 0}, "disk_full": {2, 4, 0}}


def run_args(workdir: str, cache: str, xla: str, steps: int, processes: int) -> list[str]:
  return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
          f"--config.env.compilation_cache_dir={xla}", "--config.model.hidden_dim=32",
          "--config.model.intermediate_dim=64", "--config.model.num_layers=2", "--config.model.vocab_size=512",
          "--config.model.seq_len=32", "--config.model.compute_dtype=float32", "--config.train.train_batch_size=8",
          f"--config.train.num_train_steps={steps}", "--config.train.log_every=1",
          f"--config.train.steps_per_eval={EVAL_EVERY}", "--config.train.max_eval_batches=2",
          f"--config.checkpoint.save_interval_steps={SAVE_EVERY}", "--config.train.sample_prompts=()",
          *(["--config.distributed.heartbeat_timeout_s=10", "--config.distributed.initialization_timeout_s=60"]
            if processes > 1 else [])]


class Run:
  """One start of the run: `processes` tinyjax.main processes (a SLURM step's environment when more than one)."""

  def __init__(self, args: list[str], processes: int, logs: str):
    job = str(random.SystemRandom().randrange(10_000, 99_999))  # a fresh coordinator port per start
    self.procs, self.logs = [], []
    for i in range(processes):
      env = {**os.environ, "JAX_PLATFORMS": "cpu"}
      if processes > 1:
        env.update(SLURM_JOB_ID=job, SLURM_NTASKS=str(processes), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                   SLURM_STEP_NODELIST="localhost")
      out, err = f"{logs}.{i}.out", f"{logs}.{i}.err"
      self.logs.append((out, err))
      with open(out, "w") as o, open(err, "w") as e:
        self.procs.append(subprocess.Popen([sys.executable, "-m", "tinyjax.main", *args], cwd=ROOT, env=env,
                                           stdout=o, stderr=e, stdin=subprocess.DEVNULL))
    self.started = time.monotonic()

  def running(self) -> bool:
    return any(p.poll() is None for p in self.procs)

  def trainer(self, i: int) -> int:
    """The trainer's pid of process i: a multi-process run's launched process is its supervisor."""
    pid = self.procs[i].pid
    try:
      with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    except OSError:
      children = []
    return int(children[0]) if children else pid

  def wait(self, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    codes = [p.poll() for p in self.procs]
    self.kill()  # hung: a difference of its own; nothing may outlive the trial
    return codes

  def kill(self) -> None:
    for i, p in enumerate(self.procs):
      if p.poll() is None:
        trainer = self.trainer(i)
        if trainer != p.pid:
          with contextlib.suppress(ProcessLookupError):
            os.kill(trainer, signal.SIGKILL)
        p.kill()
        p.wait()

  def stderr(self) -> list[str]:
    out = []
    for _, err in self.logs:
      with open(err, errors="replace") as f:
        out.append(f.read())
    return out


# ---- When to strike ----

def _rows(workdir: str) -> list[str]:
  try:
    with open(os.path.join(workdir, workdirs.METRICS)) as f:
      return f.read().splitlines()
  except OSError:
    return []


def _last_step(workdir: str) -> int:
  for line in reversed(_rows(workdir)):
    try:
      return int(json.loads(line).get("step", 0))
    except ValueError:
      continue
  return 0


def _saving(workdir: str) -> bool:
  ckpts = os.path.join(workdir, workdirs.CHECKPOINTS)
  return os.path.isdir(ckpts) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))


def _in_eval(workdir: str) -> bool:
  """The loss row of an eval step is written and its eval row is not yet: the eval is running."""
  rows = _rows(workdir)
  try:
    last = json.loads(rows[-1]) if rows else {}
  except ValueError:
    return False
  return "loss" in last and last.get("step", 0) % EVAL_EVERY == 0


@dataclasses.dataclass
class Fault:
  kind: str  # SIGKILL | SIGTERM | SIGHUP | disk_full
  moment: str  # setup | step | save | eval | final
  delay_s: float  # after the moment
  after_s: float = 0.0  # setup: seconds after the start
  at_step: int = 0  # step: after this step's row
  process: int = 0  # which process (2 processes)
  trainer: bool = False  # SIGKILL the trainer under its supervisor (2 processes), not the supervisor

  def __str__(self):
    where = {"setup": f"setup+{self.after_s:.1f}s", "step": f"after step {self.at_step}"}.get(self.moment, self.moment)
    who = f" to process {self.process}{' trainer' if self.trainer else ''}" if self.process or self.trainer else ""
    return f"{self.kind} {where}+{self.delay_s * 1000:.0f}ms{who}"


def draw(rng: random.Random, kinds: list[str], steps: int, setup_s: float, processes: int) -> Fault:
  kind, moment = rng.choice(kinds), rng.choice(MOMENTS)
  return Fault(kind, moment, delay_s=rng.uniform(0.0, 0.2), after_s=rng.uniform(FIRST_S, setup_s),
               at_step=rng.randint(1, steps), process=rng.randrange(processes),
               trainer=processes > 1 and kind == "SIGKILL" and rng.random() < 0.5)


def reached(f: Fault, run: Run, workdir: str, steps: int) -> bool:
  if time.monotonic() - run.started < FIRST_S:
    return False
  if f.moment == "setup":
    return time.monotonic() - run.started >= f.after_s
  if f.moment == "step":
    return _last_step(workdir) >= f.at_step
  if f.moment == "save":
    return _saving(workdir)
  if f.moment == "eval":
    return _in_eval(workdir)
  return os.path.exists(os.path.join(workdir, workdirs.CHECKPOINTS, str(steps), "commit_success.txt"))


def fill(disk: str) -> None:
  """Writes zeros into disk/filler until the tmpfs has no byte left."""
  chunk = b"\0" * (1 << 20)
  with open(os.path.join(disk, "filler"), "ab", buffering=0) as f:
    try:
      while True:
        f.write(chunk)
    except OSError:
      pass
  for size in (4096, 1):  # the last partial megabyte
    try:
      with open(os.path.join(disk, "filler"), "ab", buffering=0) as f:
        while True:
          f.write(b"\0" * size)
    except OSError:
      continue


def strike(f: Fault, run: Run, disk: str | None) -> None:
  if f.kind == "disk_full":
    fill(disk)
    return
  sig = getattr(signal, f.kind)
  pid = run.trainer(f.process) if f.trainer else run.procs[f.process].pid
  try:
    os.kill(pid, sig)
  except ProcessLookupError:
    pass


def start_and_maybe_strike(args, processes, logs, workdir, steps, fault, disk) -> tuple[list, list[str], bool]:
  """One start; strikes `fault` when its moment comes (if it does); returns (exit codes, stderr texts, struck)."""
  run, struck, due = Run(args, processes, logs), False, None
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    while fault is not None and run.running() and time.monotonic() < deadline:
      if due is None and reached(fault, run, workdir, steps):
        due = time.monotonic() + fault.delay_s
      if due is not None and time.monotonic() >= due:
        strike(fault, run, disk)
        struck = True
        break
      time.sleep(0.002)
    codes = run.wait(max(1.0, deadline - time.monotonic()))
  finally:  # the benchmark itself stopped: nothing it started may outlive it
    run.kill()
  return codes, run.stderr(), struck


# ---- What must match ----

def stable(x):
  """x without the fields that differ between any two runs (TIMED)."""
  if isinstance(x, dict):
    return {k: stable(v) for k, v in x.items() if not any(t in k.lower() for t in TIMED)}
  if isinstance(x, list):
    return [stable(v) for v in x]
  return x


def flat(x, prefix=""):
  """A nested JSON value as {dotted.path: leaf}."""
  if isinstance(x, dict):
    return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}{key}.").items()}
  if isinstance(x, list):
    return {k: v for i, val in enumerate(x) for k, v in flat(val, f"{prefix}{i}.").items()}
  return {prefix.rstrip("."): x}


def records(workdir: str) -> dict:
  """What an uninterrupted run and a chaos trial must share, and what must never be there (problems)."""
  problems, rows = [], []
  for number, line in enumerate(_rows(workdir), 1):
    try:
      rows.append(json.loads(line))
    except ValueError:
      problems.append(f"metrics.jsonl line {number} is torn: {line[:60]!r}")
  plain = [stable(r) for r in rows if "event" not in r]
  keys = [(r.get("step"), tuple(sorted(r))) for r in plain]
  dupes = sorted({k[0] for k in keys if keys.count(k) > 1}, key=str)
  if dupes:
    problems.append(f"metrics.jsonl has duplicate rows for steps {dupes}")
  out = {"rows": plain, "problems": problems, "sha": [r["param_sha256"] for r in rows if "param_sha256" in r]}
  for name in (workdirs.RUN_INFO, workdirs.RESULTS):
    try:
      with open(os.path.join(workdir, name)) as f:
        out[name] = flat(stable(json.load(f)))
    except (OSError, ValueError) as e:
      out[name] = {}
      problems.append(f"{name} unreadable ({type(e).__name__})")
  ckpts = os.path.join(workdir, workdirs.CHECKPOINTS)
  names = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
  out["checkpoints"] = [n for n in names if n.isdigit()]
  for n in names:
    if not n.isdigit():
      problems.append(f"checkpoints/{n} left behind")
    elif not workdirs.complete_checkpoint(os.path.join(ckpts, n)):
      problems.append(f"checkpoints/{n} is incomplete (half-written or half-deleted): "
                      f"{sorted(os.listdir(os.path.join(ckpts, n)))}")
  for root, dirs, files in os.walk(workdir):
    for n in dirs + files:
      if "tmp" in n.lower():
        problems.append(f"{os.path.relpath(os.path.join(root, n), workdir)} left behind")
  return out


def differences(ref: dict, got: dict) -> list[str]:
  diff = list(got["problems"])
  if got["sha"][-1:] != ref["sha"][-1:]:
    diff.append(f"final param_sha256 {got['sha'][-1:]} != {ref['sha'][-1:]}")
  ref_rows = {(r.get("step"), tuple(sorted(r))): r for r in ref["rows"]}
  got_rows = {(r.get("step"), tuple(sorted(r))): r for r in got["rows"]}
  for key in sorted(set(ref_rows) | set(got_rows), key=str):
    if ref_rows.get(key) != got_rows.get(key):
      what = "eval" if any(k.startswith("eval/") for k in key[1]) else "row"
      diff.append(f"metrics {what} at step {key[0]}: {_short(got_rows.get(key))} != {_short(ref_rows.get(key))}")
  for name in (workdirs.RUN_INFO, workdirs.RESULTS):
    keys = sorted(set(ref[name]) | set(got[name]))
    changed = [f"{k}: {got[name].get(k)!r} != {ref[name].get(k)!r}" for k in keys if ref[name].get(k) != got[name].get(k)]
    diff += [f"{name} {c}" for c in changed[:5]] + ([f"{name}: {len(changed) - 5} more fields"] if len(changed) > 5 else [])
  # The newest checkpoint must be the same step. Older ones may differ: a stop checkpoints at its own step (say 13),
  # which max_to_keep then keeps where the uninterrupted run kept 12.
  newest = lambda r: max(map(int, r["checkpoints"]), default=None)
  if newest(got) != newest(ref) or len(got["checkpoints"]) > len(ref["checkpoints"]):
    diff.append(f"checkpoints {got['checkpoints']} != {ref['checkpoints']}")
  return diff


def _short(row) -> str:
  return "absent" if row is None else json.dumps({k: row[k] for k in list(row)[:3]})[:120]


def judge_ending(fault: Fault | None, struck: bool, codes: list, errs: list[str]) -> list[str]:
  """How one start ended, against what the README documents for its fault."""
  allowed = EXPECTED[fault.kind] if fault is not None and struck else {0}
  out = []
  for i, (code, err) in enumerate(zip(codes, errs)):
    if fault is not None and struck and i != fault.process:  # the others: a stop before they agree (setup) is a
      allowed = allowed | {4}  # lost host to them (README: a stop before jax.distributed starts stops one process)
    label = f"{fault} -> process {i}" if fault else f"restart -> process {i}"
    ours = [line for line in err.splitlines() if line.startswith("tinyjax")]
    others = [line for line in err.splitlines() if line.strip() and not line.startswith("tinyjax")]
    if code is None:
      out.append(f"{label}: still running after {RUN_TIMEOUT_S}s (killed)")
    elif code not in allowed:
      out.append(f"{label}: exit {code} (expected {sorted(allowed)}): {err.strip()[-300:]!r}")
    if len(ours) > 1:
      out.append(f"{label}: {len(ours)} tinyjax lines: {ours}")
    if TRACE.search(err):
      out.append(f"{label}: trace-like output: {TRACE.search(err).group(0)!r} in {err.strip()[-300:]!r}")
    elif others:
      out.append(f"{label}: {len(others)} stderr line(s) besides tinyjax's: {others[:3]}")
  return out


# ---- Disks ----

def mount(point: str) -> bool:
  os.makedirs(point, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", point], capture_output=True,
                        check=False).returncode == 0


def unmount(point: str) -> None:
  """Unmounts, waiting for killed trainers (they die with their supervisor, a moment later) to let go of it."""
  for _ in range(20):
    if subprocess.run(["umount", point], capture_output=True, check=False).returncode == 0:
      return
    time.sleep(0.5)
  subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def trial(i: int, rng: random.Random, ref: dict, opts, kinds: list[str], setup_s: float) -> tuple[list[str], str]:
  """One trial: (its differences, a one-line account)."""
  base = os.path.join(opts.root, f"trial{i:03d}")
  os.makedirs(base)
  disk = os.path.join(base, "disk") if "disk_full" in kinds else None
  if disk and not mount(disk):
    disk = None
  workdir = os.path.join(disk or base, "w")
  args = run_args(workdir, opts.cache, opts.xla, opts.steps, opts.processes)
  faults = [draw(rng, kinds if disk else [k for k in kinds if k != "disk_full"], opts.steps, setup_s, opts.processes)
            for _ in range(rng.randint(1, 3))]
  diff, account, starts, done = [], [], 0, False
  try:
    while not done and starts < MAX_STARTS:
      fault = faults[0] if faults else None
      codes, errs, struck = start_and_maybe_strike(args, opts.processes, os.path.join(base, f"start{starts}"),
                                                   workdir, opts.steps, fault, disk)
      starts += 1
      if fault is not None:
        faults.pop(0)
        account.append(f"{fault}{'' if struck else ' (run ended first)'} -> {codes}")
      if disk:
        with_filler = os.path.join(disk, "filler")
        if os.path.exists(with_filler):
          os.remove(with_filler)  # the operator frees space, then reruns
      diff += judge_ending(fault, struck, codes, errs)
      done = not faults and all(c == 0 for c in codes)
    if not done:
      diff.append(f"no completed run after {starts} starts")
    else:
      diff += differences(ref, records(workdir))
    if diff and disk:  # kept for a look: the tmpfs goes
      shutil.copytree(workdir, os.path.join(base, "w"), dirs_exist_ok=True, ignore_dangling_symlinks=True)
  finally:
    if disk:
      unmount(disk)
  if not opts.keep and not diff:
    shutil.rmtree(base, ignore_errors=True)
  return diff, f"trial {i}: {len(account)} fault(s), {starts} start(s): " + "; ".join(account)


def main(argv: list[str] | None = None) -> int:
  parser = cli.ArgParser(prog="python -m tinyjax.benchmarks.chaos", description=cli.summary(__doc__))
  parser.add_argument("--trials", type=int, required=True, help="trials (each: 1-3 faults, then run to completion)")
  parser.add_argument("--seed", type=int, default=0, help="draws the faults and their moments")
  parser.add_argument("--processes", type=int, choices=(1, 2), default=1, help="processes of the run")
  parser.add_argument("--steps", type=int, default=16, help="training steps of the run (a multiple of 8)")
  parser.add_argument("--root", default="", help="where trials run (default: a new temporary directory)")
  parser.add_argument("--keep", action="store_true", help="keep every trial's files (default: only differing ones)")
  parser.add_argument("--kinds", default="SIGKILL,SIGTERM,SIGHUP,disk_full", help="fault kinds to draw from")
  opts = parser.parse_args(argv)
  if opts.trials < 1 or opts.steps < EVAL_EVERY or opts.steps % EVAL_EVERY:
    cli.fail(f"--trials must be >= 1 and --steps a positive multiple of {EVAL_EVERY}")
  kinds = [k for k in opts.kinds.split(",") if k]
  if not kinds or set(kinds) - set(EXPECTED):
    cli.fail(f"--kinds={opts.kinds}: allowed: {', '.join(EXPECTED)}")
  opts.root = os.path.abspath(opts.root or tempfile.mkdtemp(prefix="tinyjax-chaos-"))
  os.makedirs(opts.root, exist_ok=True)
  opts.cache, opts.xla = os.path.join(opts.root, "cache"), os.path.join(opts.root, "xla")
  began = time.monotonic()
  if "disk_full" in kinds:
    probe = os.path.join(opts.root, "probe")
    if mount(probe):
      unmount(probe)
    else:
      kinds.remove("disk_full")
      print("chaos: cannot mount a tmpfs here (needs root): no disk_full faults", flush=True)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # the cleanups below run
  ref, setup_s = reference(opts)
  if ref is None:
    return 1
  print(f"chaos: {opts.processes} process(es), {opts.steps} steps, seed {opts.seed}, faults {', '.join(kinds)}; "
        f"reference run ready after {time.monotonic() - began:.0f}s (setup {setup_s:.1f}s) in {opts.root}", flush=True)
  rng, failed = random.Random(opts.seed), {}
  for i in range(opts.trials):
    diff, account = trial(i, rng, ref, opts, kinds, max(1.0, setup_s))
    print(f"{account} -> {'identical' if not diff else 'DIFFERS'}", flush=True)
    if diff:
      failed[i] = diff
  wall = time.monotonic() - began
  print(f"chaos: wall {wall / 60:.1f} min ({wall / opts.trials:.0f}s per trial)", flush=True)
  print(f"chaos: {opts.trials - len(failed)}/{opts.trials} identical")
  for i, diff in failed.items():
    print(f"trial {i}: " + " | ".join(diff))
  return 0 if not failed else 1


def reference(opts) -> tuple[dict | None, float]:
  """The uninterrupted run's records and its time to the first step. The first run builds the token cache and fills
  the XLA cache; the second, the reference, starts as every restart does, so its setup bounds the "setup" moments."""
  for name in ("warmup", "reference"):
    ref_dir = os.path.join(opts.root, name)
    run = Run(run_args(ref_dir, opts.cache, opts.xla, opts.steps, opts.processes), opts.processes, ref_dir)
    try:
      while run.running() and _last_step(ref_dir) < 1:
        time.sleep(0.01)
      setup_s = time.monotonic() - run.started
      codes = run.wait(RUN_TIMEOUT_S)
    finally:
      run.kill()
    if codes != [0] * opts.processes:
      print(f"chaos: the uninterrupted run failed: exit {codes}: {run.stderr()[0][-2000:]}", file=sys.stderr)
      return None, 0.0
  shutil.rmtree(os.path.join(opts.root, "warmup"), ignore_errors=True)
  ref = records(ref_dir)
  if ref["problems"]:
    print(f"chaos: the uninterrupted run's records: {ref['problems']}", file=sys.stderr)
    return None, 0.0
  return ref, setup_s


if __name__ == "__main__":
  sys.exit(main())
