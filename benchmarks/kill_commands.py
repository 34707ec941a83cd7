"""Kill -9 of real `surrogate` commands at random moments, then resume or rerun.

  python benchmarks/kill_commands.py [--kills 5] [--seed 0]

On the small world of tests/self_made.py (a tiny surrogate, so a command takes seconds), each
of `surrogate fit --out`, `surrogate screen --results DIR` and `surrogate simulate --sim --out`
is run once uninterrupted (the reference), then `--kills` times killed with SIGKILL at a random
moment of its run (every other one in the last tenth, where results are written) and looked
at:

- what the killed command left: a folder later commands refuse (with a message), absent,
  or complete and identical to the reference; anything they would accept that differs is a
  finding ("partial, accepted");
- the command run again (`--resume` for the screen): its output must equal the reference's.

Prints a line per kill and the totals (goal: 0 findings).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--length", "12", "--vocab", "300"]


def _cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "calibrate", *args]


def _run(argv, timeout=600) -> tuple[int, str, str]:
  p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                     env={**os.environ, "XLA_FLAGS": ""})
  return p.returncode, p.stdout, p.stderr


def _kill_at(argv, delay: float) -> None:
  p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "XLA_FLAGS": ""})
  try:
    p.wait(timeout=delay)          # it may finish first: then nothing was killed mid-run
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()


def _sim_state(folder: str, ref: str) -> str:
  """'refused' (load raises a SimulatorError), 'absent', 'identical' or 'partial, accepted'."""
  from calibrate.fitting.saved import SimulatorError, load
  if not os.path.exists(folder):
    return "absent"
  try:
    load(folder)
  except SimulatorError:
    return "refused"
  same = all(open(os.path.join(folder, f), "rb").read() == open(os.path.join(ref, f), "rb").read()
             for f in ("arrays.npz", "tokenizer.json", "fragments.jsonl"))
  meta = [json.load(open(os.path.join(d, "simulator.json"))) for d in (folder, ref)]
  for m in meta:  # timings and the self-checksum that covers them differ between runs
    m["info"].pop("seconds")
    m.pop("sha256", None)
  return "identical" if same and meta[0] == meta[1] else "partial, accepted"


def _screen_json(out: str) -> dict:
  d = json.loads(out)
  d.pop("seconds_per_order")
  return d


def _files_state(folder: str, ref: str) -> str:
  """Each predicted RunLog either absent or byte-identical to the reference's."""
  if not os.path.exists(folder):
    return "absent"
  names = sorted(os.listdir(folder))
  for n in names:
    if open(os.path.join(folder, n), "rb").read() != open(os.path.join(ref, n), "rb").read():
      return "partial, accepted"
  return "identical" if names == sorted(os.listdir(ref)) else f"{len(names)} complete files"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=5, help="kills per command (default 5)")
  p.add_argument("--seed", type=int, default=0, help="draws the moments")
  args = p.parse_args()
  rng = random.Random(args.seed)
  from cli_fuzz import materialize
  from self_made import make_sim, make_world
  root = tempfile.mkdtemp()
  w = materialize(make_world(), make_sim(make_world()), os.path.join(root, "world"))
  orders = [w["order"], w["run3"], w["run4"]]
  jobs = {
      "fit": lambda out: _cmd("fit", "--data", w["frags"], "--runs", w["run0"], w["run1"],
                              "--out", out, "--seeds", "2", "--pretrain-steps", "30",
                              "--lr-scales", "1", "--quiet", *TINY),
      "screen": lambda out: _cmd("screen", "--sim", w["sim"], "--orders", "24", "--results", out,
                                 "--no-diagnostics", "--json", "--quiet"),
      "simulate": lambda out: _cmd("simulate", "--sim", w["sim"], "--orders", *orders, "--out",
                                   out, "--quiet"),
  }
  totals = collections.Counter()
  for name, job in jobs.items():
    ref = os.path.join(root, f"{name}-ref")
    t0 = time.perf_counter()
    code, ref_out, err = _run(job(ref))
    t_ref = time.perf_counter() - t0
    assert code == 0, err
    print(f"{name}: uninterrupted {t_ref:.1f} s", flush=True)
    for k in range(args.kills):
      out = os.path.join(root, f"{name}-{k}")
      # Every other kill falls in the last tenth of the run, where results are written.
      delay = rng.uniform(0.3, t_ref) if k % 2 == 0 else rng.uniform(0.9 * t_ref, 1.05 * t_ref)
      _kill_at(job(out), delay)
      if name == "fit":
        left = _sim_state(out, ref)
        _run(job(out))
        again = _sim_state(out, ref)
      elif name == "screen":
        left = "resumable" if os.path.exists(os.path.join(out, "orders")) or os.path.exists(
            out) else "absent"
        code, o, e = _run(job(out) + ["--resume"])
        again = "identical" if code == 0 and _screen_json(o) == _screen_json(ref_out) else (
            f"differs (exit {code}: {e.strip()[-200:]})")
      else:
        left = _files_state(out, ref)
        _run(job(out))
        again = _files_state(out, ref)
      bad = left == "partial, accepted" or again != "identical"
      totals["kills"] += 1
      totals["findings"] += bad
      print(f"  kill {k} at {delay:5.1f} s: left {left}; run again: {again}"
            + ("   <-- finding" if bad else ""), flush=True)
  shutil.rmtree(root)
  print(f"\n{totals['kills']} kills, {totals['findings']} findings")


if __name__ == "__main__":
  main()
