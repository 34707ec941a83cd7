"""Every `surrogate` command fed malformed inputs, counted: trials per case and outcomes.

  python benchmarks/fuzz_cli.py [--examples 2000] [--seed 0]

Uses the harness of tests/test_cli_fuzz.py (tests/cli_fuzz.py) on the small world of
tests/self_made.py, in process. Prints, per case, the trials, how many ended with exit 0 (the
edits left the input valid) or exit 2 with one line naming the broken file or flag (both
documented), and the undocumented outcomes (goal 0) with the first few of them.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--examples", type=int, default=2000, help="trials in all (default 2000)")
  p.add_argument("--seed", type=int, default=0, help="Hypothesis's seed")
  args = p.parse_args()
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  from cli_fuzz import CASES, judge, materialize, trial
  from hypothesis import HealthCheck, Phase, given, seed, settings
  from hypothesis import strategies as st
  from self_made import make_sim, make_world

  t0 = time.perf_counter()
  world = make_world()
  sim = make_sim(world)
  base = tempfile.mkdtemp()
  valid = materialize(world, sim, os.path.join(base, "world"))
  counts = collections.defaultdict(collections.Counter)
  findings = collections.defaultdict(list)

  @seed(args.seed)
  @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))
  @given(case=st.sampled_from(CASES), data=st.data())
  def one(case, data):
    outcome = trial(valid, case, data.draw)
    problems = judge(outcome)
    counts[case.name]["trials"] += 1
    counts[case.name]["undocumented" if problems else f"exit {outcome.code}"] += 1
    if problems:
      findings[case.name].append(problems[0])

  one()
  shutil.rmtree(base)
  print(f"{'case':<32}{'trials':>8}{'exit 0':>8}{'exit 2':>8}{'undocumented':>14}")
  total = collections.Counter()
  for c in CASES:
    n = counts[c.name]
    total.update(n)
    print(f"{c.name:<32}{n['trials']:>8}{n['exit 0']:>8}{n['exit 2']:>8}{n['undocumented']:>14}")
  print(f"{'all':<32}{total['trials']:>8}{total['exit 0']:>8}{total['exit 2']:>8}"
        f"{total['undocumented']:>14}")
  for name, found in findings.items():
    print(f"\n{name}: {len(found)} undocumented, e.g.")
    for f in list(dict.fromkeys(found))[:5]:
      print(f"  {f}")
  print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
