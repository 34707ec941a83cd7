"""Calibration: recovering known settings, saving, validating, and bad input."""

import dataclasses
import json
import os
import warnings

import jax
import numpy as np
import pytest
from self_made import CFG, CONFIG, NEUTRAL, OPT, SEED, TRUE_LR_SCALE

from calibrate.answers.outcomes import OUTCOMES, Outcome, compare, what_if
from calibrate.fitting.calibration import FitInfo, predict, schedule
from calibrate.fitting.fit import (
  FitConfig,
  FitError,
  check_runs,
  default_lr_scale,
  effect_error_from,
  effect_error_prior,
  fit,
  train_fidelity,
)
from calibrate.fitting.runs import predict_runs, predicted_runlogs
from calibrate.fitting.saved import SimulatorError, load, save
from calibrate.fitting.validate import validate
from calibrate.io.runlog import order_from_runlog, run_learning_rates
from surrogate.datasets import python_docs
from surrogate.prepare import model_config_for

KEY = jax.random.key(0)


def test_fit_recovers_the_learning_rate_scale(sim):
  info = sim.fit_info
  assert info.lr_scale == TRUE_LR_SCALE
  misfit = {c.lr_scale: c.shape_misfit for c in info.knob_candidates}
  assert misfit[2.0] < misfit[1.0] < misfit[0.5]
  assert info.calibration_runs == ("shuffled-a", "blocked-a", "shuffled-b")
  # A structured calibration run shows order effects, so the runs move the gain off its prior.
  assert info.gain.data_weight > 0.5
  # ... and the same runs, not the prior, set the error of the predicted effects.
  e = info.effect_error
  assert abs(e.used - e.leave_one_run_out) < 0.5 * abs(e.prior - e.leave_one_run_out)
  assert sim.calibration.effect_error == e.used
  assert FitInfo.from_json(info.to_json()) == info


@pytest.mark.parametrize("true_e", [0.0, 0.6])
def test_effect_error_is_recovered_from_residuals(true_e):
  # Residuals of 5 left-out runs x 9 steps x 7 fragments, Normal(0, s^2 + (e x effect)^2).
  rng = np.random.default_rng(3)
  s_CxF = rng.uniform(0.01, 0.03, (9, 7))
  effect = rng.uniform(0.0, 0.4, (5, 9, 7))
  res = rng.standard_normal(effect.shape) * np.sqrt(s_CxF ** 2 + (true_e * effect) ** 2)
  assert abs(effect_error_from(res, effect, s_CxF) - true_e) < 0.15


def test_train_fidelity_measures_how_well_the_surrogate_follows_the_runs():
  # 4 runs x 6 eval steps x 5 fragments; the surrogate's 3 seeds share one pattern.
  rng = np.random.default_rng(5)
  pattern = rng.normal(0, 0.1, (4, 6, 5))
  sur = pattern[None] + rng.normal(0, 0.01, (3, 4, 6, 5))
  follows = 2.0 * pattern + rng.normal(0, 0.02, pattern.shape)   # real = gain x pattern
  unrelated = rng.normal(0, 0.2, pattern.shape)
  assert train_fidelity(follows, sur) > 0.95
  assert abs(train_fidelity(unrelated, sur)) < 0.2
  # Step 0 is the shared start (not scored), a NaN fragment (no train evals) is skipped.
  follows[:, 0] = unrelated[:, 0]
  follows[..., 2] = np.nan
  assert train_fidelity(follows, sur) > 0.95
  assert train_fidelity(follows[:1], sur[:, :1]) is None


def test_effect_error_prior_grows_as_the_fidelity_falls():
  cfg = FitConfig()
  assert effect_error_prior(FitConfig(effect_error=0.7), 0.9) == 0.7   # configured wins
  assert effect_error_prior(cfg, None) == cfg.fallback_effect_error    # no train evals
  e = [effect_error_prior(cfg, rho) for rho in (0.95, 0.8, 0.4, 0.0, -0.5)]
  assert e == sorted(e) and e[0] < 0.2 and abs(e[1] - 0.3 * 0.75) < 1e-9
  assert e[3] == e[4] < 0.3 * 8.01                                      # capped


def test_fit_wants_the_shape_a_given_tokenizer_was_trained_for(world, sim):
  frags, runs = world
  with pytest.raises(ValueError, match="model_cfg"):
    fit(frags, runs[:3], tokenizer=sim.tokenizer, key=KEY)


def test_predictions_on_held_out_orders_beat_the_mean(world, sim):
  report = validate(sim, world[1][3:])
  ours = report.methods["simulator"]
  assert ours["trajectory_mse_ratio"] < 0.5
  assert ours["decision_accuracy"] > 0.6
  assert report.methods["order_agnostic"]["trajectory_mse_ratio"] == pytest.approx(1.0)
  assert 0.0 <= ours["coverage"] <= 1.0
  assert "simulator" in report.format_table() and '"methods"' in report.to_json()


def test_predicted_runlogs_keep_ids_steps_and_intervals(world, sim):
  runs = world[1][3:]
  pred = predict_runs(sim, runs)
  logs = predicted_runlogs(sim, runs, pred)
  for run, log in zip(runs, logs):
    assert log.header.run_id == run.header.run_id and log.num_steps == run.num_steps
    assert log.eval_steps == run.eval_steps
    for ev_pred, ev_real in zip(log.evals, run.evals):
      assert ev_pred.losses.keys() == ev_real.losses.keys()
      lo, hi = ev_pred.extra["losses_lo"], ev_pred.extra["losses_hi"]
      assert all(lo[i] <= ev_pred.losses[i] + 1e-6 and ev_pred.losses[i] <= hi[i] + 1e-6
                 for i in lo)
  # Every run starts from the same state: the prediction at step 0 is the anchor exactly.
  np.testing.assert_allclose(pred.mean_NxCxM[:, 0], pred.mean_NxCxM[:1, 0].repeat(len(runs), 0))


def test_save_load_round_trip_and_tampering(world, sim, tmp_path):
  save(sim, tmp_path / "sim")
  again = load(tmp_path / "sim")
  runs = world[1][3:5]
  np.testing.assert_allclose(predict_runs(again, runs).mean_NxCxM,
                             predict_runs(sim, runs).mean_NxCxM, rtol=1e-5)
  with open(tmp_path / "sim" / "arrays.npz", "r+b") as f:
    f.truncate(os.path.getsize(tmp_path / "sim" / "arrays.npz") // 2)
  with pytest.raises(SimulatorError, match="arrays.npz.*sha256"):
    load(tmp_path / "sim")
  with pytest.raises(SimulatorError, match="simulator.json is missing"):
    load(tmp_path / "nothing")
  # A folder of another format says which, and who wrote it.
  meta_path = tmp_path / "sim" / "simulator.json"
  meta = json.loads(meta_path.read_text())
  assert meta["written_by"].startswith("surrogate-sim ")
  meta_path.write_text(json.dumps({**meta, "format": "surrogate-simulator/2",
                                   "written_by": "surrogate-sim 9.0"}))
  with pytest.raises(SimulatorError, match=r"simulator.json.*format 'surrogate-simulator/2' "
                                           r"\(written by surrogate-sim 9.0\)"):
    load(tmp_path / "sim")
  # An edited setting is caught as an edited array is.
  meta_path.write_text(json.dumps({**meta, "num_steps": meta["num_steps"] + 1}))
  with pytest.raises(SimulatorError, match=r"simulator.json.*changed after saving"):
    load(tmp_path / "sim")


def test_bad_runs_are_clear_errors(world):
  frags, runs = world
  other = python_docs(("try", "import"), max_train=12, max_probe=4)
  with pytest.raises(FitError, match="another fragments file"):
    check_runs(other, runs[:2])
  mixed = dataclasses.replace(runs[1], header=dataclasses.replace(
      runs[1].header, optimizer={**OPT, "name": "sgd"}))
  with pytest.raises(FitError, match="optimizer"):
    check_runs(frags, [runs[0], mixed])
  short = dataclasses.replace(runs[0], evals=runs[0].evals[:1])
  with pytest.raises(FitError, match="too short"):
    check_runs(frags, [short])
  with pytest.raises(FitError, match="no evals"):
    check_runs(frags, [dataclasses.replace(runs[0], evals=())])
  with pytest.raises(FitError, match="at least one"):
    check_runs(frags, [])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check_runs(frags, runs[:1])
  assert any("single run" in str(w.message) for w in caught)


def test_validate_refuses_calibration_runs(world, sim):
  with pytest.raises(ValueError, match="used to calibrate"):
    validate(sim, world[1][:4])


def test_an_order_with_other_optimizer_settings_is_simulated_with_a_warning(world, sim):
  frags, runs = world
  order = dataclasses.replace(runs[3], evals=(), header=dataclasses.replace(
      runs[3].header, optimizer={**OPT, "lr": 6e-3}))
  with pytest.warns(UserWarning, match="extrapolation"):
    faster = predict_runs(sim, [order])
  same = predict_runs(sim, [dataclasses.replace(runs[3], evals=())])
  # Its own (doubled) learning rate is used: the prediction moves.
  assert not np.allclose(faster.mean_NxCxM[:, -1], same.mean_NxCxM[:, -1])


def test_what_if_outcomes(world, sim):
  frags, runs = world
  subset = runs[4]  # feeds fragments 0 and 1 only
  answer = what_if(sim, subset, key=KEY)
  np.testing.assert_allclose(answer.outcome_FxO.sum(1), 1.0)
  assert answer.probe_CxF.shape == (len(answer.steps), 4)
  # Fragments 2 and 3 are never fed: no own contribution, so they cannot generalize or be
  # memorized, whatever else happens to them.
  np.testing.assert_array_equal(answer.own_probe_F[2:], 0.0)
  gen, mem = OUTCOMES.index(Outcome.GENERALIZES), OUTCOMES.index(Outcome.MEMORIZED)
  assert (answer.outcome_FxO[2:, [gen, mem]] == 0).all()
  assert (answer.probe_lo_CxF <= answer.probe_hi_CxF).all()
  assert "outcome" in answer.table()


def test_compare_ranks_orders(world, sim):
  frags, runs = world
  cmp = compare(sim, {"blocked": runs[3], "subset": runs[4], "interleaved": runs[5]})
  assert sorted(cmp.names) == ["blocked", "interleaved", "subset"]
  assert (np.diff(cmp.mean) >= 0).all()
  assert cmp.p_best.sum() == pytest.approx(1.0)
  assert (cmp.lo <= cmp.hi).all()
  assert cmp.table().splitlines()[1].split()[1] == cmp.names[0]


def _drop_ids(run, keep):
  evals = tuple(dataclasses.replace(ev, losses={i: v for i, v in ev.losses.items() if keep(i)})
                for ev in run.evals)
  return dataclasses.replace(run, evals=evals)


def test_partial_train_evals_fit_and_probe_only_runs_validate(world):
  frags, runs = world
  split = {e.id: (e.fragment, e.split.value) for e in frags.examples}
  # Calibration runs that evaluate no train example of one fragment (evals of train
  # examples are "where affordable"); held-out runs that evaluate probes only.
  cal = [_drop_ids(r, lambda i: split[i] != (frags.names[3], "train")) for r in runs[:3]]
  held = [_drop_ids(r, lambda i: split[i][1] == "probe") for r in runs[3:]]
  sim = fit(frags, cal, model_cfg=CFG, config=dataclasses.replace(CONFIG, lr_scales=(1.0,)),
            key=jax.random.key(SEED), neutral_texts=NEUTRAL, progress=False)
  assert np.isfinite(sim.calibration.gain_F).all() and np.isfinite(sim.fit_info.fit_mse)
  report = validate(sim, held)
  assert np.isfinite(report.methods["simulator"]["trajectory_mse"])


def test_an_order_file_is_predicted_as_its_run_at_shared_steps(world, sim):
  run = world[1][3]                                 # evals at 0, 10, 20, 30
  as_order = dataclasses.replace(run, evals=())     # evals every 20: 0, 20, 30
  a, b = predict_runs(sim, [run]), predict_runs(sim, [as_order])
  np.testing.assert_array_equal(b.steps, [0, 20, 30])
  np.testing.assert_allclose(b.mean_NxCxM, a.mean_NxCxM[:, [0, 2, 3]], rtol=1e-5, atol=1e-6)


def test_a_surrogate_diverging_at_every_scale_is_a_clear_fit_error(world):
  frags, runs = world
  config = dataclasses.replace(CONFIG, lr_scales=(3e4,), pretrain_steps=10)
  with pytest.raises(FitError, match=r"diverged at every candidate .*\[30000\.0\].*lr-scales 1"):
    fit(frags, runs[:2], model_cfg=CFG, config=config, key=jax.random.key(SEED),
        neutral_texts=NEUTRAL,
        progress=False)


def test_fit_picks_the_context_and_its_rate_from_the_data(world):
  frags, runs = world
  cfg, _ = model_config_for(frags)
  config = dataclasses.replace(CONFIG, seeds=1, pretrain_steps=5, lr_scales=None)
  sim = fit(frags, runs[:2], config=config, key=jax.random.key(SEED), neutral_texts=NEUTRAL,
            progress=False)
  assert sim.model_cfg == cfg and cfg.length in (32, 64)
  assert sim.fit_info.lr_scale == default_lr_scale(cfg.length)
  assert [default_lr_scale(n) for n in (16, 32, 64)] == [2.0, 2.0, 3.0]


def test_runs_and_arrays_take_one_prediction_path(world, sim):
  # A run evaluated at the calibration steps, predicted through the RunLog edge, is exactly
  # the array path at those steps.
  run = world[1][3]
  via_runlog = predict_runs(sim, [run])
  via_arrays, traj = predict(sim, order_from_runlog(run, sim.fragments)[None],
                             run_learning_rates(run)[None], run.eval_steps)
  np.testing.assert_array_equal(via_runlog.members_NxKxCxM, via_arrays.members_NxKxCxM)
  np.testing.assert_array_equal(via_runlog.fragment_sd_NxCxM, via_arrays.fragment_sd_NxCxM)
  assert traj.eval_loss_CxM.shape == (sim.num_seeds, len(run.eval_steps), len(sim.eval_ids))
  # One seed per order: that seed's members of the all-seeds prediction.
  one, _ = predict(sim, order_from_runlog(run, sim.fragments)[None], schedule(sim), sim.steps_C,
                   seed_N=np.array([1]))
  every, _ = predict(sim, order_from_runlog(run, sim.fragments)[None], schedule(sim),
                     sim.steps_C)
  g = len(sim.config.gain_quantiles)
  np.testing.assert_array_equal(one.members_NxKxCxM, every.members_NxKxCxM[:, g:2 * g])


def test_predict_refuses_what_it_cannot_predict(world, sim):
  order = order_from_runlog(world[1][3], sim.fragments)
  with pytest.raises(ValueError, match="cannot predict beyond"):
    predict(sim, np.concatenate([order, order])[None], schedule(sim), [0])
  with pytest.raises(ValueError, match="not within"):
    predict(sim, order[None], schedule(sim), [0, sim.num_steps + 1])
  with pytest.raises(ValueError, match=r"shape \[N >= 1, T >= 1"):
    predict(sim, order[None, :0], schedule(sim), [0])
  with pytest.raises(ValueError, match=r"shape \[N >= 1"):
    predict(sim, order, schedule(sim), [0])


def test_fit_info_reads_the_older_layouts_of_the_same_format(sim):
  old = sim.fit_info.to_json()
  for key in ("calibration_orders_sha256", "train_fidelity"):
    del old[key]
  old["effect_error"] = 0.25                             # a plain number, as first saved
  info = FitInfo.from_json(old)
  assert info.calibration_orders_sha256 == () and info.train_fidelity is None
  assert info.effect_error.used == 0.25 and info.effect_error.leave_one_run_out is None
