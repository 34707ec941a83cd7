"""The analytic tier inside the simulator: fitted and checked on a calibrated simulator,
saved in its folder, chosen by `resolve_tier`, and answering through the one prediction path
exactly where its trust check allows."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from calibrate.answers import screen as screen_lib
from calibrate.answers.families import failure_points
from calibrate.answers.outcomes import compare, what_if
from calibrate.answers.search import gradient_search
from calibrate.cli.main import main
from calibrate.fitting import analytic as tier_lib
from calibrate.fitting.calibration import (fragment_means, predict, predict_fragments,
                                           resolve_tier, schedule)
from calibrate.fitting.saved import SimulatorError, load, save
from calibrate.io.runlog import order_from_runlog, read_runlog, write_runlog
from surrogate import analytic, orders
from surrogate.errors import CalibrationError


@pytest.fixture(scope="module")
def fitted(sim, world):
  """The tier fitted on the tiny simulator's simulations (2 orders of each family)."""
  frags, runs = world
  cal = [order_from_runlog(r, frags) for r in runs[:3]]
  return tier_lib.fit_tier(sim, cal, key=jax.random.key(1), orders_per_family=2, steps=300)


@pytest.fixture(scope="module")
def checked(sim, fitted):
  return tier_lib.check_fidelity(sim, fitted, key=jax.random.key(2), orders=12)


def test_the_tier_fits_a_calibrated_simulator_and_is_checked_on_fresh_orders(sim, world,
                                                                              fitted, checked):
  frags, runs = world
  num_f = len(frags.names)
  assert fitted.x0_Sx2xF.shape == (sim.num_seeds, 2, num_f)
  assert fitted.cal_SxCx2xF.shape == (sim.num_seeds, len(sim.steps_C), 2, num_f)
  assert fitted.fit_orders == 3 + 2 * len(orders.FAMILIES)
  assert np.all(np.isfinite(fitted.fit_mse_S)) and not fitted.trusted  # unchecked: untrusted
  fid = checked.fidelity
  assert fid.orders == 12 and fid.decisions_F.shape == (num_f,)
  assert 0.0 <= fid.order_decisions <= 1.0 and 0.0 <= fid.seed_order_decisions <= 1.0
  assert checked.trusted == fid.trusted and fid.reason.startswith(
      "trusted" if fid.trusted else "not trusted")
  back = tier_lib.Fidelity.from_json(json.loads(json.dumps(fid.to_json())))
  assert back.reason == fid.reason and back.ratio_interval == fid.ratio_interval
  (f_lo, f_hi), (o_lo, o_hi) = fid.ratio_interval
  assert f_lo <= f_hi and o_lo <= o_hi and "90 % intervals" in fid.reason
  cal = np.stack([order_from_runlog(r, frags) for r in runs[:3]])
  feats = tier_lib.tier_features(sim, cal)
  one = tier_lib.tier_losses(checked, feats, sim.steps_C, seed_N=np.array([0, 1, 0]))
  every = tier_lib.tier_losses(checked, feats, sim.steps_C)
  np.testing.assert_allclose(one[1], every[1, 1], rtol=1e-5)


def test_the_check_s_interval_narrows_with_more_orders_and_holds_the_ratio():
  # Four seeds of one world: a common order effect plus seed noise; the tier is the world
  # with less noise, so it agrees with each seed at least as well as two seeds agree.
  rng = np.random.default_rng(0)
  def world(n):
    effect_NxF = rng.normal(size=(n, 5))
    sur = effect_NxF[None] + 0.7 * rng.normal(size=(4, n, 5))
    return effect_NxF[None] + 0.3 * rng.normal(size=(4, n, 5)), sur
  few, many = tier_lib.ratio_interval(*world(8)), tier_lib.ratio_interval(*world(96))
  for (lo, hi), (lo_m, hi_m) in zip(few, many):
    assert lo <= hi and lo_m <= hi_m and hi - lo > 2 * (hi_m - lo_m)
  ana, sur = world(96)
  got = tier_lib.agreement(ana, sur)
  ratio = np.nanmean(got["decisions_F"]) / np.nanmean(got["seed_decisions_F"])
  assert many[0][0] <= ratio <= many[0][1] and ratio > 1.0


def test_the_tier_follows_the_learning_rate_against_the_calibration_peak(sim, world, fitted):
  frags, runs = world
  order = order_from_runlog(runs[3], frags)[None]
  lr = schedule(sim)
  full = fitted.fragment_rows(sim, order, lr[None], sim.steps_C, np.array([0]))
  slow = fitted.fragment_rows(sim, order, 0.25 * lr[None], sim.steps_C, np.array([0]))
  # The fast first drop moves whatever is fed, so a quarter of the rate moves less overall.
  moved = lambda x: np.nanmean(np.abs(x[0, -1] - x[0, 0]))  # noqa: E731
  assert moved(slow) < moved(full)
  # A shorter order is padded, not rescaled: its first steps are the full order's.
  half = sim.num_steps // 2
  short = fitted.fragment_rows(sim, order[:, :half], lr[None, :half], np.array([0, half]),
                               np.array([0]))
  same = fitted.fragment_rows(sim, order, lr[None], np.array([0, half]), np.array([0]))
  np.testing.assert_allclose(short, same, rtol=1e-5)


def test_resolve_tier_falls_back_to_the_transformer_and_says_why(sim, fitted, checked):
  assert resolve_tier(sim, "auto") == (None, resolve_tier(sim, "auto")[1])
  assert "no analytic tier" in resolve_tier(sim, "auto")[1]
  with pytest.raises(CalibrationError, match="no analytic tier"):
    resolve_tier(sim, "analytic")
  with pytest.raises(CalibrationError, match="tier must be one of"):
    resolve_tier(sim, "fast")
  unchecked = dataclasses.replace(sim, analytic=fitted)
  assert resolve_tier(unchecked, "auto")[0] is None
  assert "never checked" in resolve_tier(unchecked, "auto")[1]
  assert resolve_tier(unchecked, "analytic")[0] is fitted
  with pytest.raises(CalibrationError, match="no diagnostics"):
    resolve_tier(unchecked, "analytic", diagnostics=True)
  trusted = dataclasses.replace(sim, analytic=dataclasses.replace(
      checked, fidelity=dataclasses.replace(checked.fidelity, trusted=True, reason="trusted: x")))
  chosen, why = resolve_tier(trusted, "auto")
  assert chosen is trusted.analytic and why == "analytic: trusted: x"
  assert resolve_tier(trusted, "auto", diagnostics=True)[0] is None
  assert resolve_tier(trusted, "transformer")[0] is None


def test_the_trust_check_rejects_a_wrong_tier_and_the_answers_fall_back(sim, world, fitted):
  # Fed fragments pushed up instead of down, every other coefficient as fitted: its final
  # losses rank the orders against the transformer's. (The latent form: each probe's
  # minimum moved to its train examples' reflected, so learning a fragment hurts its probes.)
  p = fitted.params
  if isinstance(p, analytic.LatentParams):
    centre = p.centre_2xFxK
    p = p._replace(centre_2xFxK=centre.at[:, 0].set(-3.0 * centre[:, 1]))
  else:
    p = p._replace(transfer_2xFxF=-3.0 * p.transfer_2xFxF)
  wrong = dataclasses.replace(fitted, params=p)
  rejected = tier_lib.check_fidelity(sim, wrong, key=jax.random.key(2), orders=12)
  fid = rejected.fidelity
  assert not rejected.trusted and fid.reason.startswith("not trusted")
  assert np.nanmean(fid.decisions_F) < tier_lib.TRUST_RATIO * np.nanmean(fid.seed_decisions_F)
  frags, runs = world
  answer = what_if(dataclasses.replace(sim, analytic=rejected), runs[4], key=jax.random.key(0))
  assert answer.tier == "transformer" and "not trusted" in answer.tier_reason


def test_predictions_through_the_tier_are_deviations_from_its_calibration_mean(sim, world,
                                                                                checked):
  frags, runs = world
  with_tier = dataclasses.replace(sim, analytic=checked)
  cal = np.stack([order_from_runlog(r, frags) for r in runs[:3]])
  pred, traj = predict(with_tier, cal, schedule(sim), sim.steps_C, tier="analytic")
  assert pred.tier == "analytic" and pred.tier_reason.startswith("analytic: asked for")
  assert pred.members_NxKxCxM.shape[:2] == (3, sim.num_seeds * len(sim.config.gain_quantiles))
  # The calibration orders' mean over seeds and orders is the anchor, as for the transformer.
  gain_mid = len(sim.config.gain_quantiles) // 2
  mid = pred.members_NxKxCxM.reshape(3, sim.num_seeds, -1, *pred.members_NxKxCxM.shape[2:])
  np.testing.assert_allclose(mid[:, :, gain_mid].mean((0, 1)), sim.calibration.anchor_CxM,
                             atol=1e-4)
  assert np.isnan(traj.grad_push_CxF).all() and (traj.diverged_step == -1).all()
  other = order_from_runlog(runs[3], frags)
  ranked = compare(with_tier, {"cal0": cal[0], "other": other}, tier="analytic")
  assert ranked.tier == "analytic"
  probe = fragment_means(sim, pred.mean_NxCxM)
  assert np.isfinite(probe[:, -1]).all()


def test_the_tier_is_saved_in_the_simulator_folder(sim, world, checked, tmp_path):
  frags, runs = world
  with_tier = dataclasses.replace(sim, analytic=checked)
  save(with_tier, tmp_path / "sim")
  back = load(tmp_path / "sim")
  assert back.analytic.fit_orders == checked.fit_orders
  assert back.analytic.betas == checked.betas
  assert back.analytic.fidelity.reason == checked.fidelity.reason
  order = np.stack([order_from_runlog(runs[3], frags)])
  a, _ = predict(with_tier, order, schedule(sim), sim.steps_C, tier="analytic")
  b, _ = predict(back, order, schedule(sim), sim.steps_C, tier="analytic")
  np.testing.assert_allclose(a.members_NxKxCxM, b.members_NxKxCxM, rtol=1e-6)
  (tmp_path / "sim" / "analytic.npz").write_bytes(b"not an npz")
  with pytest.raises(SimulatorError, match="analytic.npz"):
    load(tmp_path / "sim")


def test_a_latent_tier_is_saved_with_its_form_and_answers_through_predict(sim, world,
                                                                           tmp_path):
  frags, runs = world
  cal = [order_from_runlog(r, frags) for r in runs[:3]]
  latent = tier_lib.fit_tier(sim, cal, key=jax.random.key(1), orders_per_family=1, steps=100,
                             form="latent")
  assert latent.form == "latent" and latent.betas == tier_lib.adam_betas(sim)
  num_f = len(frags.names)
  assert latent.params.centre_2xFxK.shape == (sim.num_seeds, 2, num_f, 4 * num_f)
  with_tier = dataclasses.replace(sim, analytic=latent)
  save(with_tier, tmp_path / "sim")
  back = load(tmp_path / "sim").analytic
  assert back.form == "latent" and type(back.params) is type(latent.params)
  order = np.stack([order_from_runlog(runs[3], frags)])
  a, _ = predict(with_tier, order, schedule(sim), sim.steps_C, tier="analytic")
  b, _ = predict(dataclasses.replace(sim, analytic=back), order, schedule(sim), sim.steps_C,
                 tier="analytic")
  assert np.isfinite(a.members_NxKxCxM).all()
  np.testing.assert_allclose(a.members_NxKxCxM, b.members_NxKxCxM, rtol=1e-6)
  with pytest.raises(ValueError, match="form must be one of"):
    tier_lib.fit_on(sim, np.stack(cal), np.zeros((sim.num_seeds, 3, 1, 2, 1)), calibration=3,
                    form="cubic")


def test_cli_tier_fits_checks_saves_and_the_answers_say_which_tier(sim, world, tmp_path,
                                                                   capsys):
  frags, runs = world
  save(sim, tmp_path / "sim")
  paths = []
  for i, r in enumerate(runs[:5]):
    paths.append(str(tmp_path / f"run{i}.jsonl"))
    write_runlog(paths[-1], r)
  base = ["tier", "--sim", str(tmp_path / "sim"), "--orders-per-family", "1", "--fresh", "8",
          "--fit-steps", "100", "--json", "--quiet"]
  assert main(base + ["--runs", paths[0], paths[1]]) == 2  # a calibration run is missing
  assert "give every calibration run" in capsys.readouterr().err
  assert main(base + ["--runs", *paths[:3]]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["fit_orders"] == 3 + len(orders.FAMILIES) and out["fidelity"]["orders"] == 8
  assert load(tmp_path / "sim").analytic is not None
  ask = ["what-if", "--sim", str(tmp_path / "sim"), "--orders", paths[3], paths[4], "--json",
         "--quiet"]
  assert main(ask + ["--tier", "analytic"]) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["tier"] == "analytic" and len(got["ranking"]) == 2
  assert main(ask) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["tier"] == ("analytic" if out["trusted"] else "transformer")
  assert main(["simulate", "--sim", str(tmp_path / "sim"), "--orders", paths[3], "--out",
               str(tmp_path / "pred"), "--tier", "analytic", "--json", "--quiet"]) == 0
  assert json.loads(capsys.readouterr().out)["tier"] == "analytic"
  written = read_runlog(str(tmp_path / "pred" / "run3.jsonl"), frags)
  assert written.header.extra["simulator"]["tier"] == "analytic"
  design = ["search", "--sim", str(tmp_path / "sim"), "--method", "gradient", "--phases", "2",
            "--restarts", "2", "--verify", "1", "--json", "--quiet"]
  assert main(design + ["--tier", "analytic", "--out", str(tmp_path / "designed.jsonl")]) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["method"] == "gradient" and got["tier"] == "transformer"  # it verified
  assert len(got["ranked"]) == 2 and len(got["phase_weights"]) == 1
  assert (tmp_path / "designed.jsonl").exists()
  if not out["trusted"]:
    assert main(design) == 2
    assert "gradient search needs the analytic tier" in capsys.readouterr().err


def test_validate_scores_the_tier_beside_the_transformer(sim, world, checked):
  from calibrate.fitting.validate import validate
  frags, runs = world
  plain = validate(sim, runs[3:])
  assert "analytic_tier" not in plain.methods
  report = validate(dataclasses.replace(sim, analytic=checked), runs[3:])
  ana, sur = report.methods["analytic_tier"], report.methods["simulator"]
  assert sur == plain.methods["simulator"]  # the transformer's column is the same
  assert 0.0 <= ana["decision_accuracy"] <= 1.0 and 0.0 <= ana["coverage"] <= 1.0
  assert np.isfinite(ana["trajectory_mse"]) and ana["trajectory_mse"] != sur["trajectory_mse"]
  assert "analytic_tier" in report.format_table()


def test_fragment_predictions_are_the_fragment_means_of_the_example_predictions(sim, world,
                                                                                checked):
  frags, runs = world
  with_tier = dataclasses.replace(sim, analytic=checked)
  some = np.stack([order_from_runlog(r, frags) for r in runs[:4]])
  steps = np.array([0, sim.steps_C[1], sim.steps_C[-1]])
  for tier, seed_n in (("analytic", None), ("analytic", np.array([0, 1, 1, 0])),
                       ("transformer", np.array([1, 0, 1, 0]))):
    pred, _ = predict(with_tier, some, schedule(sim), steps, seed_N=seed_n, tier=tier)
    frag, traj = predict_fragments(with_tier, some, schedule(sim), steps, seed_N=seed_n,
                                   tier=tier)
    assert frag.tier == pred.tier == tier and frag.tier_reason == pred.tier_reason
    want = np.stack([fragment_means(sim, pred.members_NxKxCxM),
                     fragment_means(sim, pred.members_NxKxCxM, probe=False)], -2)
    np.testing.assert_allclose(frag.members_NxKxCx2xF, want, rtol=1e-6, atol=1e-6)


def test_a_screen_through_the_tier_runs_in_blocks_and_leaves_starvation_unknown(
    sim, checked, monkeypatch):
  monkeypatch.setattr(screen_lib, "BLOCK_PAIRS", 4)  # 11 pairs: blocks of 4, 4 and 3
  with_tier = dataclasses.replace(sim, analytic=checked)
  sc = screen_lib.screen(with_tier, n_orders=22, key=jax.random.key(3), tier="analytic")
  num_f = len(sim.fragments.names)
  assert sc.tier == "analytic" and len(sc.specs) == 11 and sc.diagnostics == {}
  # Families and left-out fragments keep their turns across blocks.
  fams = list(orders.FAMILIES)
  assert list(sc.families_P) == [fams[p % len(fams)] for p in range(11)]
  for p, f in enumerate(sc.left_out_P):
    turn = np.roll(np.arange(num_f), -(p % num_f))
    assert f == next(g for g in turn if sc.fed_PxF[p, g])
  assert sc.pairs_F.sum() == 11 and sc.probe_PxCxF.shape == (11, len(sim.steps_C), num_f)
  judged = sc.pairs_F > 0
  np.testing.assert_allclose(sc.outcome_FxO[judged].sum(1), 1.0, atol=1e-9)
  assert np.isnan(sc.starved_F).all() and np.isnan(sc.starved_PxF).all()
  assert not [p for p in failure_points(sc) if p.kind == "starvation"]
  assert "unknown" in sc.table() and "nan%" not in sc.table()


def test_gradient_search_designs_phase_mixtures_and_the_transformer_ranks_them(sim, checked,
                                                                               tmp_path):
  with_tier = dataclasses.replace(sim, analytic=checked)
  names = sim.fragments.names
  res = gradient_search(with_tier, objective={names[0]: 1.0}, phases=2, restarts=3, steps=40,
                        draws=2, verify=2, key=jax.random.key(5), tier="analytic")
  ranked = res.ranked
  assert ranked.tier == "transformer" and set(ranked.names) >= {"shuffled"}
  assert len(ranked.names) == 3 and np.all(np.diff(ranked.score_N) >= 0)  # best first
  assert res.start_best == ranked.score_N[ranked.names.index("shuffled")]
  assert res.p_best.sum() == pytest.approx(1.0)
  for name, w in res.phase_weights.items():
    assert w.shape == (2, len(names)) and np.allclose(w.sum(1), 1.0)
  # The target fragment is fed more than a shuffle feeds it (1 / F of the slots).
  winner = next(n for n in ranked.names if n != "shuffled")
  fed = orders.fragment_counts(ranked.orders_NxTxB[ranked.names.index(winner)],
                               sim.fragments.fragment_of, len(names))
  assert fed[0] / fed.sum() > 1 / len(names)
  assert "1: " in res.table() and "shuffled reference" in res.table()
  res.save_order(with_tier, tmp_path / "designed.jsonl")
  unverified = gradient_search(with_tier, phases=2, restarts=2, steps=10, verify=0,
                               key=jax.random.key(5), tier="analytic")
  assert unverified.ranked.tier == "analytic"
  with pytest.raises(CalibrationError, match="gradient search needs the analytic tier"):
    gradient_search(sim, key=jax.random.key(5))
