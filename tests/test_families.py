"""Answers by feeding type on screens whose per-order figures are known."""

import numpy as np
import pytest

from calibrate.answers.families import (MEASURES, by_family, diagnostic_status, failure_points,
                                        interactions)
from calibrate.answers.outcomes import OUTCOMES
from calibrate.answers.screen import DIAGNOSTICS, Screen, _starvation, forgetting_onset
from surrogate.orders import OrderSpec

NAMES = ("a", "b", "c")   # F = 3
STEPS = np.array([0, 10, 20, 30])


def _screen(kinds, *, drop_PxF=None, own_PxF=None, left_out_P=None, fed_PxF=None,
            forget_step_PxF=None, starve_step_PxF=None, seed=0) -> Screen:
  """A screen of orders of the given kinds; unset per-order figures are small noise."""
  rng = np.random.default_rng(seed)
  p, f, c = len(kinds), len(NAMES), len(STEPS)
  noise = lambda: rng.normal(0, 1e-3, (p, f))  # noqa: E731
  specs = tuple(OrderSpec("subset", keep=(0, 1)) if k == "subset"
                else OrderSpec("blocked", sequence=(0, 1, 2)) if k == "blocked"
                else OrderSpec("shuffled") for k in kinds)
  left_out_P = np.arange(p) % f if left_out_P is None else np.asarray(left_out_P)
  fed = np.ones((p, f)) if fed_PxF is None else np.asarray(fed_PxF, float)
  nan = np.full((p, f), np.nan)
  outcome = np.zeros((p, len(OUTCOMES)))
  outcome[:, 0] = 1.0
  return Screen(
      fragments=NAMES, steps=STEPS, specs=specs, left_out_P=left_out_P,
      outcome_FxO=np.zeros((f, len(OUTCOMES))), pairs_F=np.bincount(left_out_P, minlength=f),
      own_probe_F=np.zeros(f), own_probe_abs_F=np.zeros(f), gain_F=np.zeros(f),
      gain_lo_F=np.zeros(f), gain_hi_F=np.zeros(f), interference_FxF=np.zeros((f, f)),
      probe_PxCxF=np.ones((p, c, f)),
      diagnostics={n: rng.normal(0, 1e-3, (p, c, f)) for n in (*DIAGNOSTICS, "entropy")},
      starved_F=np.zeros(f), collapsed_F=np.zeros(f), diverged=(), seconds_per_order=0.0,
      fed_PxF=fed, drop_PxF=noise() if drop_PxF is None else drop_PxF,
      own_PxF=noise() if own_PxF is None else own_PxF, outcome_PxO=outcome,
      forgotten_PxF=np.zeros((p, f)),
      forget_step_PxF=nan if forget_step_PxF is None else forget_step_PxF,
      starved_PxF=np.isfinite(nan if starve_step_PxF is None else starve_step_PxF),
      starve_step_PxF=nan if starve_step_PxF is None else starve_step_PxF)


def test_forgetting_onset_is_the_first_eval_that_far_above_the_minimum():
  probe_PxCxF = np.array([[4.0, 3.0, 3.05, 3.2],    # min at 10; 3.05 < 1.02 x 3; 3.2 above
                          [4.0, 3.0, 2.9, 2.8],     # never rises: not forgotten
                          [4.0, 3.0, 3.5, 3.0]])[:, :, None]   # rises, then recovers
  onset = forgetting_onset(probe_PxCxF, STEPS, 0.02)[:, 0]
  assert onset[0] == 30 and np.isnan(onset[1]) and np.isnan(onset[2])


def test_starvation_onset_is_the_first_interval_whose_push_share_is_too_small():
  # Two fragments fed equally; the second's push share falls to 10 % after step 20.
  fed_CxF = np.array([[0, 0], [10, 10], [20, 20], [30, 30]], float)
  push_CxF = np.array([[0, 0], [5, 5], [10, 10], [19, 11]], float)
  starved, step = _starvation(push_CxF[None], fed_CxF[None], STEPS, 0.25)
  assert not starved[0, 1]                   # over the whole run: 11/30 > 0.25 x 1/2
  strong = np.array([[0, 0], [5, 5], [9.5, 0.5], [19, 1]], float)
  starved, step = _starvation(strong[None], fed_CxF[None], STEPS, 0.25)
  assert starved[0].tolist() == [False, True] and step[0, 1] == 20 and np.isnan(step[0, 0])


def test_by_family_finds_what_blocking_changes_and_nothing_else():
  kinds = ["shuffled"] * 24 + ["blocked"] * 24
  drop = np.random.default_rng(1).normal(0.3, 0.01, (48, 3))
  drop[24:, 1] += 0.05                       # blocking helps b by 5 points, nothing else
  view = by_family(_screen(kinds, drop_PxF=drop), level=0.99)
  assert view.families == ("shuffled", "blocked") and view.orders_K.tolist() == [24, 24]
  assert set(view.measures) == set(MEASURES)
  d = view.vs_shuffled["probe_drop"]
  assert d.mean_KxF[1, 1] == pytest.approx(0.05, abs=0.01)
  assert d.clear_KxF()[1].tolist() == [False, True, False]
  assert np.allclose(d.mean_KxF[0], 0) and not d.clear_KxF()[0].any()
  assert (d.lo_KxF[1, 1] < d.mean_KxF[1, 1] < d.hi_KxF[1, 1])
  # A measure that needs a pair averages only the pairs leaving the fragment out.
  own = view.measures["own_contribution"]
  assert own.n_KxF.sum() == 48 and (own.n_KxF == 8).all()
  assert "b" in view.table() and "+0.05" in view.table()
  assert view.to_json()["diagnostic_status"]["plasticity"].startswith("surrogate-internal")


def test_starved_share_counts_only_orders_that_feed_the_fragment():
  kinds = ["shuffled"] * 4 + ["subset"] * 4
  fed = np.ones((8, 3))
  fed[4:, 2] = 0                             # the subsets never feed c
  steps = np.full((8, 3), np.nan)
  steps[:4, 2] = 20                          # ... and c is starved in every shuffle
  view = by_family(_screen(kinds, fed_PxF=fed, starve_step_PxF=steps))
  st = view.measures["starved"]
  assert st.n_KxF[:, 2].tolist() == [4, 0] and st.mean_KxF[0, 2] == 1.0
  assert np.isnan(st.mean_KxF[1, 2])
  (point,) = failure_points(_screen(kinds, fed_PxF=fed, starve_step_PxF=steps))
  assert (point.fragment, point.kind, point.share, point.orders) == ("c", "starvation", 1.0, 4)
  assert point.step == 20 and point.worst_family == "shuffled"


def test_interactions_name_reinforcing_and_disturbing_pairs_and_unfed_changes():
  p = 60
  rng = np.random.default_rng(2)
  left = np.arange(p) % 3
  own = rng.normal(0, 0.002, (p, 3))
  own[left == 0, 1] += 0.03                  # feeding a helps b ...
  own[left == 1, 0] += 0.02                  # ... and b helps a: they reinforce each other
  own[left == 2, 0] -= 0.04                  # feeding c hurts a
  fed = np.ones((p, 3))
  fed[:20, 2] = 0
  drop = rng.normal(0.2, 0.01, (p, 3))
  drop[:20, 2] = 0.1 + rng.normal(0, 0.01, 20)   # c changes even where it is not fed
  inter = interactions(_screen(["shuffled"] * p, own_PxF=own, left_out_P=left, fed_PxF=fed,
                               drop_PxF=drop))
  assert [(i, j) for i, j, _, _ in inter.reinforcing] == [("a", "b")]
  assert [(i, j) for i, j, _ in inter.disturbs] == [("c", "a")]
  assert inter.unfed_change.n_KxF[0].tolist() == [0, 0, 20]
  assert inter.unfed_change.mean_KxF[0, 2] == pytest.approx(0.1, abs=0.01)
  assert "a <-> b" in inter.table() and "c: probe loss down" in inter.table()


def test_only_validated_diagnostics_are_called_predictions_of_the_real_model():
  status = diagnostic_status({"logit_shift": {"median": 0.7, "predicted": True, "orders": 20},
                              "plasticity": {"median": 0.1, "predicted": False, "orders": 20}})
  assert status["logit_shift"].startswith("predicts the real model")
  assert status["plasticity"].startswith("surrogate-internal") and "0.10" in status["plasticity"]
  assert "not validated" in status["attention_shift"]
  assert all(v.startswith("surrogate-internal") for v in diagnostic_status().values())
