"""Answers for users on a small calibrated simulator: screen, search, next run, report."""

import dataclasses
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from calibrate.answers.families import by_family, failure_points, interactions
from calibrate.answers.outcomes import OUTCOMES, Outcome, Thresholds, label_outcomes, what_if
from calibrate.answers.report import trajectories_of, write_report
from calibrate.answers.screen import screen
from calibrate.answers.search import evaluate, next_run, search
from calibrate.fitting.validate import validate
from calibrate.io.runlog import order_from_runlog, read_runlog
from surrogate import orders

# The world has F=4 fragments; 16 runs are 8 orders with their counterfactuals, 2 per fragment.
N_ORDERS = 16


@pytest.fixture(scope="module")
def screened(sim):
  return screen(sim, n_orders=N_ORDERS, key=jax.random.key(1), chunk_size=8)


def test_screen_outcome_probabilities_sum_to_one(sim, screened):
  assert screened.outcome_FxO.shape == (4, len(OUTCOMES))
  judged = screened.pairs_F > 0
  assert judged.sum() >= 3 and screened.pairs_F.sum() == N_ORDERS // 2
  np.testing.assert_allclose(screened.outcome_FxO[judged].sum(1), 1.0, atol=1e-9)
  assert ((screened.outcome_FxO[judged] >= 0) & (screened.outcome_FxO[judged] <= 1)).all()
  # The diagonal of the interference matrix is the own contribution.
  np.testing.assert_allclose(np.diag(screened.interference_FxF), screened.own_probe_F)
  assert set(screened.diagnostics) == {"embedding_drift", "attention_shift", "plasticity",
                                       "logit_shift", "robustness", "entropy"}
  assert screened.diagnostics["plasticity"].shape == (N_ORDERS // 2, len(sim.steps_C), 4)
  assert np.isfinite(screened.gain_F).all()
  assert ((screened.starved_F >= 0) & (screened.starved_F <= 1)).all()
  assert screened.diverged == ()
  table = screened.table()
  assert all(name in table for name in sim.fragments.names)


def test_screen_leaves_out_only_fragments_the_order_feeds(sim, screened):
  for spec, f in zip(screened.specs, screened.left_out_P):
    if spec.kind is orders.OrderKind.SUBSET:
      assert f in spec.keep


def test_a_left_out_fragment_never_generalizes_from_its_own_training(world, sim):
  _, runs = world
  subset = runs[4]                                   # feeds fragments 0 and 1 only
  answer = what_if(sim, subset, key=jax.random.key(0))
  g, m = OUTCOMES.index(Outcome.GENERALIZES), OUTCOMES.index(Outcome.MEMORIZED)
  for f in (2, 3):
    assert answer.outcome_FxO[f, g] == 0 and answer.outcome_FxO[f, m] == 0
    assert answer.own_probe_F[f] == 0


def test_search_is_at_least_as_good_as_its_start_set(sim, tmp_path):
  num_f = len(sim.fragments.names)
  start = {"shuffled": orders.OrderSpec("shuffled"),
           "blocked": orders.OrderSpec("blocked", sequence=[3, 2, 1, 0]),
           "mixture": orders.random_spec("mixture", num_f, key=jax.random.key(5))}
  result = search(sim, budget=7, start=start, rounds=2, keep=2, key=jax.random.key(2),
                  chunk_size=8)
  assert len(result.ranked.names) == 7
  score = dict(zip(result.ranked.names, result.ranked.score_N))
  assert result.ranked.score_N[0] <= min(score[n] for n in start) + 1e-12
  assert result.ranked.score_N[0] == result.start_best or result.ranked.names[0] not in start
  assert np.all(np.diff(result.ranked.score_N) >= 0)
  np.testing.assert_allclose(result.p_best.sum(), 1.0)
  lo, hi = result.interval(0)
  assert lo <= result.ranked.score_N[0] <= hi
  # The winner, exported as an order file, reads back as the same order.
  path = tmp_path / "best.jsonl"
  result.save_order(sim, path)
  back = order_from_runlog(read_runlog(path, sim.fragments), sim.fragments)
  np.testing.assert_array_equal(back, result.best_order)
  # ...and as a PyTorch sampler, which yields the same examples in the same order.
  pytest.importorskip("torch")
  assert list(result.batch_sampler()) == result.best_order.tolist()


def test_search_objective_weights_target_fragments(sim):
  one = evaluate(sim, {"s": orders.OrderSpec("shuffled")}, objective={"try": 1.0},
                 key=jax.random.key(0), chunk_size=8)
  np.testing.assert_allclose(one.members_NxK, one.final_NxKxF[..., 0])
  with pytest.raises(ValueError, match="unknown fragments"):
    evaluate(sim, {"s": orders.OrderSpec("shuffled")}, objective={"nope": 1.0},
             key=jax.random.key(0))


def test_next_run_prefers_the_order_the_ensemble_disagrees_on(sim):
  cands = {"shuffled": orders.OrderSpec("shuffled"),
           "only-try": orders.OrderSpec("subset", keep=[0]),
           "blocked": orders.OrderSpec("blocked", sequence=[1, 2, 3, 0])}
  nr = next_run(sim, cands, key=jax.random.key(3))
  spread = dict(zip(nr.ranked.names, nr.ranked.spread_N))
  assert nr.ranked.names[0] == max(spread, key=spread.get)
  assert np.all(np.diff(nr.ranked.spread_N) <= 0)
  # With no uncertainty left in the gains and a single seed, members agree on every order.
  cal = sim.calibration
  certain = dataclasses.replace(sim, calibration=cal._replace(
      gain_sd_F=np.zeros_like(cal.gain_sd_F),
      params_S=jax.tree.map(lambda a: np.repeat(np.asarray(a)[:1], 2, 0), cal.params_S),
      sur_cal_SxCxM=np.repeat(cal.sur_cal_SxCxM[:1], 2, 0)))
  flat = next_run(certain, cands, key=jax.random.key(3))
  np.testing.assert_allclose(flat.ranked.spread_N, 0.0, atol=1e-6)
  assert nr.ranked.spread_N[0] > 1e-4


def test_report_is_a_self_contained_page_that_renders(world, sim, screened, tmp_path):
  _, runs = world
  result = search(sim, budget=3, rounds=1, keep=1, key=jax.random.key(4), chunk_size=8)
  plots = trajectories_of(sim, runs[:2] + runs[3:5], chunk_size=8)
  assert [p.held_out for p in plots] == [False, False, True, True]
  for p in plots:
    assert (p.lo_CxF <= p.pred_CxF + 1e-9).all() and (p.pred_CxF <= p.hi_CxF + 1e-9).all()
    np.testing.assert_allclose(p.real_CxF[0], plots[0].real_CxF[0])   # one start state
  html_path = write_report(tmp_path, sim, screen=screened, search=result, trajectories=plots,
                           validation=validate(sim, runs[3:]))
  page = open(html_path, encoding="utf-8").read()
  assert page.count("data:image/png;base64,") == 6
  assert "Validated on 3 held-out real runs" in page
  # The by-family view; these runs carry no real diagnostics, so none is a real prediction.
  assert "By feeding type" in page and "Failure points" in page
  assert page.count("surrogate-internal (not validated against real runs)") == 5
  import matplotlib.image as mpimg
  for name in ("trajectories", "outcomes", "interference", "diagnostics", "by_family",
               "ranking"):
    img = mpimg.imread(tmp_path / f"{name}.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None:
    pytest.skip("no headless Chromium here (apt install chromium) to screenshot the page")
  shot = tmp_path / "shot.png"
  subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                  "--window-size=1100,2000", f"--screenshot={shot}", f"file://{html_path}"],
                 check=True, capture_output=True, timeout=120)
  img = mpimg.imread(shot)
  assert img.shape[:2] == (2000, 1100)
  assert img[..., :3].std() > 0.05          # not a blank page
  assert os.path.getsize(shot) > 20_000


def test_a_diverging_screen_is_reported_not_a_crash(sim):
  from surrogate import optim
  wild = dataclasses.replace(sim, calibration=sim.calibration._replace(
      knobs=optim.Knobs(np.float32(np.inf), np.float32(1.0))))
  sc = screen(wild, n_orders=4, chunk_size=4, diagnostics=False, key=jax.random.key(0))
  assert sc.diverged == (0, 1)
  assert "2 simulated orders diverged" in sc.table()
  assert np.isnan(sc.outcome_FxO).all()          # nothing left to judge, and no exception
  view = by_family(sc)
  assert all(np.isnan(e.mean_KxF).all() for e in view.measures.values())
  assert failure_points(sc) == [] and interactions(sc).reinforcing == ()


def test_outcome_labels_follow_designs_precedence():
  t = Thresholds()
  f, g, m, n = (OUTCOMES.index(o) for o in (Outcome.FORGOTTEN, Outcome.GENERALIZES,
                                              Outcome.MEMORIZED, Outcome.NOT_LEARNED))
  # final, min, own probe, own train -> forgotten beats generalizes beats memorized.
  final = np.array([1.03, 1.0, 1.0, 1.0, np.nan])
  low = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
  own_p = np.array([0.5, 0.05, 0.01, 0.01, 0.5])
  own_t = np.array([0.5, 0.5, 0.05, 0.0, 0.5])
  np.testing.assert_array_equal(label_outcomes(final, low, own_p, own_t, t), [f, g, m, n, g])
