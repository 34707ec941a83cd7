"""Verdicts on counterfactual families: own contributions, labels, interference, scoring."""

import dataclasses

import jax
import numpy as np
import pytest
from self_made import order_file

from calibrate.answers.report import write_report
from calibrate.fitting import verdicts
from calibrate.fitting.runs import predict_runs, predicted_runlogs
from calibrate.fitting.validate import validate
from calibrate.fitting.verdicts import OUTCOMES, Outcome
from surrogate import orders
from surrogate.errors import CalibrationError

GEN, MEM, NOT, FORGOT = (OUTCOMES.index(o) for o in (Outcome.GENERALIZES, Outcome.MEMORIZED,
                                                      Outcome.NOT_LEARNED, Outcome.FORGOTTEN))


def test_verdicts_of_follows_design_md():
  # Base row 0 and the runs without fragments 2, 0 and 1; F=3, C=2 eval steps.
  probe = np.array([[[5.0, 5.0, 5.0], [4.0, 4.5, 4.8]],    # base
                    [[5.0, 5.0, 5.0], [4.1, 4.6, 5.0]],    # without 2
                    [[5.0, 5.0, 5.0], [5.0, 4.4, 4.8]],    # without 0
                    [[5.0, 5.0, 5.0], [3.9, 4.5, 4.8]]])   # without 1
  train = np.array([[2.0, 2.0, 2.0], [2.0, 2.0, 2.5], [3.0, 2.0, 2.0], [2.0, 2.1, 2.0]])
  v = verdicts.verdicts_of(probe, train, [2, 0, 1])
  np.testing.assert_allclose(v.own_probe, [0.2 / 5.0, 1.0 / 5.0, 0.0], atol=1e-12)
  np.testing.assert_allclose(v.own_train, [0.5 / 2.5, 1.0 / 3.0, 0.1 / 2.1])
  # 2 %: fragment 2 generalizes, fragment 0 too, fragment 1 is only memorized.
  assert v.labels.tolist() == [GEN, GEN, MEM]
  np.testing.assert_allclose(v.interference[1], (probe[2, -1] - probe[0, -1]) / probe[2, -1])
  # A probe loss 2 % above its minimum at the end is forgotten, whatever else.
  rising = probe.copy()
  rising[0, 0, 1] = 4.0
  assert verdicts.verdicts_of(rising, train, [2, 0, 1]).labels[2] == FORGOT


def test_dilution_follows_the_extra_examples():
  fragment_of = np.array([0, 0, 1, 1, 2, 2])
  base = np.array([[0, 2], [4, 1], [3, 5]])                 # two of each fragment
  without_0 = np.array([[2, 2], [4, 3], [3, 5]])            # fragment 0's slots -> 1, 1
  d = verdicts.dilution_interference(base, without_0[None], fragment_of, np.array([0.3, 0.1, 0.2]))
  # Fragment 1 gets 2 extra on 2: its loss falls by its own contribution x 1; fragment 2's not.
  np.testing.assert_allclose(d[0, 1:], [-0.1, 0.0])


@pytest.fixture(scope="module")
def family(world, sim):
  """A base shuffle and the same order without each fragment, as order files."""
  frags = world[0]
  pools = frags.train_pools()
  base = orders.OrderSpec(orders.OrderKind.SHUFFLED).generate(
      pools, key=jax.random.key(50), steps=30, batch_size=4)
  files = [order_file(frags, "cf-base", base)]
  for f, name in enumerate(frags.names):
    w = orders.without_fragment(base, pools, f, key=jax.random.key(60 + f))
    header = dataclasses.replace(files[0].header, run_id=f"cf-without-{f}", extra={
        "counterfactual_of": {"base": "cf-base", "without": name}})
    files.append(dataclasses.replace(order_file(frags, f"cf-without-{f}", w), header=header))
  return files


def _as_real(sim, files, seed=0, suffix=""):
  """The simulator's own predictions of the family, as real runs of one seed."""
  runs = predicted_runlogs(sim, files, predict_runs(sim, files))
  out = []
  for f, r in zip(files, runs):
    extra = dict(f.header.extra)
    if "counterfactual_of" in extra:
      extra["counterfactual_of"] = {**extra["counterfactual_of"], "base": "cf-base" + suffix}
    out.append(dataclasses.replace(r, header=dataclasses.replace(
        r.header, run_id=f.header.run_id + suffix, seed=seed, extra=extra)))
  return out


def test_a_family_predicted_by_the_simulator_itself_is_scored_perfectly(world, sim, family,
                                                                       tmp_path):
  real = _as_real(sim, family) + _as_real(sim, family, seed=1, suffix="-s1")
  report = validate(sim, real)
  (fam,) = report.verdicts
  assert len(fam["fragments"]) == 4 and fam["seed_rerun"] is not None
  figures, seed = fam["simulator"], fam["seed_to_seed"]
  assert figures["own_probe_spearman"] == pytest.approx(1.0)
  assert figures["own_probe_sign_agreement"] == 1.0
  assert figures["interference_spearman"] > 0.95
  # Two identical "seeds" agree exactly.
  assert seed["own_probe_spearman"] == pytest.approx(1.0) and seed["label_accuracy"] == 1.0
  assert "counterfactual family" in report.format_table()
  page = open(write_report(tmp_path, sim, validation=report), encoding="utf-8").read()
  assert "Verdicts on the real counterfactual family of cf-base" in page
  # Swap which run is "without" which fragment: the own contributions no longer follow.
  swapped = [real[0]] + [dataclasses.replace(r, evals=real[1 + (i + 1) % 4].evals)
                         for i, r in enumerate(real[1:5])]
  worse = validate(sim, swapped).verdicts[0]["simulator"]
  assert worse["own_probe_mean_abs_error"] > figures["own_probe_mean_abs_error"]


def test_a_malformed_family_is_a_clear_error(world, sim, family):
  frags = world[0]
  no_base = family[1:]
  with pytest.raises(CalibrationError, match="base run 'cf-base' is not among"):
    verdicts.families(no_base, frags)
  bad = dataclasses.replace(family[1], header=dataclasses.replace(
      family[1].header, extra={"counterfactual_of": {"base": "cf-base", "without": "nope"}}))
  with pytest.raises(CalibrationError, match="counterfactual_of.*'nope' is not a fragment"):
    verdicts.families([family[0], bad], frags)
  # Claims to leave out fragment 1 but is the order without fragment 0.
  liar = dataclasses.replace(family[1], header=dataclasses.replace(
      family[1].header, extra={"counterfactual_of": {"base": "cf-base",
                                                     "without": frags.names[1]}}))
  with pytest.raises(CalibrationError, match="is not 'cf-base''s order without"):
    verdicts.families([family[0], liar], frags)
  with pytest.raises(CalibrationError, match="expected"):
    verdicts.families([dataclasses.replace(family[1], header=dataclasses.replace(
        family[1].header, extra={"counterfactual_of": "cf-base"}))], frags)
