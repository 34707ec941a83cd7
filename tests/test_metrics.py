"""Accuracy metrics: the estimated noise ceiling over pairs that were run once, and
decisions split by how clearly the real runs decide."""

import numpy as np

from calibrate.fitting import metrics


def test_seed_agreement_bounds_and_order():
  real = np.array([[1.0, 2.0], [1.5, 2.1], [3.0, 2.2]])          # R=3 orders, F=2
  assert metrics.expected_seed_agreement(real, np.zeros(2)) == 1.0
  assert abs(metrics.expected_seed_agreement(real, np.full(2, 1e6)) - 0.5) < 1e-3
  noisy = [metrics.expected_seed_agreement(real, np.full(2, v)) for v in (1e-4, 1e-2, 1.0)]
  assert noisy[0] > noisy[1] > noisy[2] >= 0.5
  assert np.isnan(metrics.expected_seed_agreement(real, np.full(2, 1e-2), pairs=[]))


def test_seed_agreement_estimates_the_agreement_of_two_re_runs():
  rng = np.random.default_rng(0)
  r, f, sd = 40, 12, 0.01
  true = rng.normal(0, 0.02, (r, f))                 # order effects of a few sd of seed noise
  once, again, third = (true + rng.normal(0, sd, (r, f)) for _ in range(3))
  measured = metrics.decision_accuracy(again, third)  # two re-runs of every order
  estimate = metrics.expected_seed_agreement(once, np.full(f, sd ** 2))
  assert 0.6 < measured < 0.95
  assert abs(estimate - measured) < 0.03


def test_decisions_by_margin_splits_all_decisions_and_ceilings_rise_with_margin():
  rng = np.random.default_rng(1)
  r, f, sd = 30, 7, 0.01
  true = rng.normal(0, 0.03, (r, f))
  once, again = (true + rng.normal(0, sd, (r, f)) for _ in range(2))
  bands = metrics.decisions_by_margin(again, once, np.full(f, sd ** 2))
  assert [b["lo"] for b in bands] == [0.0, 1.0, 2.0, 4.0] and bands[-1]["hi"] == np.inf
  assert sum(b["decisions"] for b in bands) == r * (r - 1) // 2 * f
  # Accuracy over the bands, weighted by their decisions, is decision_accuracy itself.
  pooled = sum(b["accuracy"] * b["decisions"] for b in bands) / (r * (r - 1) // 2 * f)
  assert abs(pooled - metrics.decision_accuracy(again, once)) < 1e-12
  ceilings = [b["ceiling"] for b in bands]
  assert ceilings == sorted(ceilings) and ceilings[0] < 0.75 and ceilings[-1] > 0.97
  # A re-run is right about as often as the ceiling says, in every band.
  for b in bands:
    assert abs(b["accuracy"] - b["ceiling"]) < 0.06
  perfect = metrics.decisions_by_margin(once, once, np.full(f, sd ** 2))
  assert all(b["accuracy"] == 1.0 for b in perfect)
  assert metrics.decisions_by_margin(once[:1], once[:1], np.full(f, sd ** 2)) == []
