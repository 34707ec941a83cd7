"""The committed real run set is complete, readable, and shows real order effects.

These assert facts about real training that the whole project depends on; if a regenerated
set stops showing them, the set (not the test) is wrong.
"""

import glob
import os

import numpy as np
import pytest

from calibrate.io.runlog import read_runlog
from calibrate.reference import SETS
from surrogate.fragments import read_fragments

ROOT = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")
TASKS = [t for t in SETS if len(glob.glob(os.path.join(ROOT, t, "runs", "*.jsonl"))) >= 24]


@pytest.fixture(scope="module", params=TASKS)
def runs(request):
  data = os.path.join(ROOT, request.param)
  frags = read_fragments(os.path.join(data, "fragments.jsonl"))
  logs = {os.path.basename(p)[:-6]: read_runlog(p, frags)
          for p in sorted(glob.glob(os.path.join(data, "runs", "*.jsonl")))}
  return frags, logs


def test_the_lm_set_is_committed():
  assert "lm" in TASKS, "calibrate/reference/data/lm must hold the 24 committed runs"


def _probe_CxF(frags, log):
  """Mean probe loss per fragment at each eval: [C, F]."""
  pools = [[frags.examples[i].id for i in pool] for pool in frags.probe_pools()]
  return np.array([[np.mean([e.losses[i] for i in pool]) for pool in pools] for e in log.evals])


def test_set_is_complete_and_dense(runs):
  frags, logs = runs
  calibration = [k for k in logs if k.startswith("shuffled")]
  reruns = [k for k in logs if k.endswith("-s1") and k[:-3] in logs]
  heldout = [k for k in logs if k not in calibration and k not in reruns]
  assert len(calibration) >= 4 and len(heldout) >= 16 and len(reruns) >= 4
  for log in logs.values():
    assert log.num_steps >= 200 and len(log.evals) >= 10
    assert set(frags.examples[i].id for i in frags.probe_indices()) <= set(log.evals[-1].losses)


def test_blocked_orders_forget_early_blocks(runs):
  """A fragment of the first half of the blocks gains on the others while its block is fed,
  and loses that edge afterwards.

  (Its absolute probe loss may still fall later: the fine-tune shifts the whole domain.)
  LoRA forgets less: on the LoRA set one early fragment of one order (blocked-p2) keeps its
  edge (-0.04 nats), so there every order's early blocks lose it on average, and all but
  one of them do.
  """
  frags, logs = runs
  lora = "adapter" in next(iter(logs.values())).header.extra
  for name in ("blocked-p0", "blocked-p1", "blocked-p2", "blocked-p3", "blocked-p0-reversed"):
    log = logs[name]
    seq = log.header.extra["order_spec"]["sequence"]
    probe = _probe_CxF(frags, log)
    rel = probe - probe.mean(1, keepdims=True)  # loss relative to the mean fragment
    block = log.num_steps // len(seq)
    steps = list(log.eval_steps)
    early = seq[: len(seq) // 2]
    lost = [rel[-1, f] - rel[steps.index((i + 1) * block), f] for i, f in enumerate(early)]
    kept_edge = sum(x <= 0 for x in lost)
    assert kept_edge <= (1 if lora else 0) and np.mean(lost) > 0.15, (name, np.round(lost, 3))


def test_left_out_fragments_gain_less_than_fed_ones(runs):
  """Against a shuffle of every fragment: fragments differ in how much any fine-tune moves
  them (on `multilingual` a left-out language may still gain most), so each is compared with
  itself."""
  frags, logs = runs
  shuffle = _probe_CxF(frags, logs["shuffled-s0"])
  for name in ("subset-0", "subset-1", "subset-2"):
    log = logs[name]
    keep = set(log.header.extra["order_spec"]["keep"])
    probe = _probe_CxF(frags, log)
    gain = (probe[0] - probe[-1]) - (shuffle[0] - shuffle[-1])
    fed = [f for f in range(len(frags.names)) if f in keep]
    left = [f for f in range(len(frags.names)) if f not in keep]
    assert gain[left].mean() < gain[fed].mean(), (name, gain)


def test_order_matters_more_than_the_seed(runs):
  frags, logs = runs
  finals = {k: _probe_CxF(frags, v)[-1] for k, v in logs.items()}
  seed_gap = np.mean([np.abs(finals[k] - finals[k[:-3]]).mean()
                      for k in finals if k.endswith("-s1") and k[:-3] in finals])
  order_gap = np.mean([np.abs(finals["blocked-p0"] - finals[k]).mean()
                       for k in ("blocked-p1", "interleaved", "subset-1", "mixture-skewed")])
  assert order_gap > 2 * seed_gap, (order_gap, seed_gap)


CF_TASKS = [t for t in ("lm", "cls", "lm-dev")
            if len(glob.glob(os.path.join(ROOT, t, "counterfactual", "*.jsonl"))) >= 8]


def test_the_counterfactual_families_are_committed():
  assert set(CF_TASKS) == {"lm", "lm-dev", "cls"}, \
      "calibrate/reference/data/*/counterfactual must hold the committed families"


@pytest.mark.parametrize("task", CF_TASKS)
def test_own_contributions_stand_out_of_seed_noise(task):
  """Feeding a fragment lowers its own final probe loss by more than two seeds of the
  same runs differ, for most fragments: the family can judge own contributions."""
  from calibrate.fitting.verdicts import families
  data = os.path.join(ROOT, task)
  frags = read_fragments(os.path.join(data, "fragments.jsonl"))
  logs = [read_runlog(p, frags)
          for p in sorted(glob.glob(os.path.join(data, "counterfactual", "*.jsonl")))]
  by_seed = {}
  for fam in families(logs, frags):
    base = _probe_CxF(frags, logs[fam.base])[-1]
    by_seed[logs[fam.base].header.seed] = {
        f: _probe_CxF(frags, logs[i])[-1][f] - base[f] for f, i in fam.without.items()}
    # Only that fragment's slots changed: the run without it never feeds it.
    assert set(fam.without) == set(range(len(frags.names)))
  own0, own1 = (np.array([by_seed[s][f] for f in sorted(by_seed[s])]) for s in (0, 1))
  noise_sd = np.sqrt(np.mean((own0 - own1) ** 2) / 2)   # of one seed's own contribution
  mean = (own0 + own1) / 2
  assert np.mean(mean > 3 * noise_sd / np.sqrt(2)) >= 2 / 3, (mean, noise_sd)
