"""`surrogate demo`: the whole job on the bundled real runs, in a few minutes.

The bundled set (`calibrate/reference/data/lm`) holds 24 real fine-tunes of a small GPT-2
on 12 fragments of text from Debian's `fortunes` (made by `calibrate.reference`). The demo:

1. loads the bundled simulator: the surrogate ensemble distilled from the runs' real base
   model (a teacher: its next-token distributions, `surrogate teach`), then calibrated on
   four of them (two shuffled runs, one blocked and one subset run: structured runs pin the
   gain map) with
   its analytic tier fitted on the transformer's simulations and checked on 64 fresh
   orders (`surrogate demo --calibrate --save-sim calibrate/reference/data/lm/demo-simulator`
   remakes it from the real runs: about 28 minutes here);
2. checks the analytic tier again on a few fresh orders of its own (`check`), printing the
   interval so few orders leave; the stored check decides which tier answers unless
   this one refutes it (a ratio's whole interval below the bar);
3. screens random feeding orders, each with its counterfactual, through the tier that
   passed (10,000 simulated runs through the analytic tier, 128 through the transformer),
   and prints per fragment the probability of each outcome, the expected probe-loss drop
   and the failure points;
4. searches for the best order, starting from the best screened ones;
5. shows predicted against real probe losses for real runs it never saw, and the
   transformer's diagnostics against the real model's;
6. writes the report (HTML and PNGs) and a JSON summary.

The surrogate is fit's default with a teacher (64 tokens per example on this data, at three
times the real rate, reading the real model's tokens), whose accuracy docs/results.md
reports, as it does the tier's; `--no-teacher` calibrates one without it here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

CALIBRATION = ("shuffled-s0", "shuffled-s1", "blocked-p1", "subset-1")
HELD_OUT = ("blocked-p0", "interleaved", "mixture-skewed", "curriculum-easy-hard")
SCREEN_RUNS = {"analytic": 10_000, "transformer": 128}  # the screen's default size by tier
CHECK_ORDERS = 8  # the demo's own check of the tier; the bundled simulator's used 64
BUNDLED_CHECK_ORDERS = 64


def _data_dir() -> str:
  import calibrate
  return os.path.join(os.path.dirname(calibrate.__file__), "reference", "data", "lm")


def bundled_simulator() -> str:
  """The folder of the bundled calibrated simulator (it may be absent in a source tree that
  has not made it)."""
  return os.path.join(_data_dir(), "demo-simulator")


class TorchMissing(ImportError):
  """Calibrating with the teacher needs torch, which is an optional extra."""


def _bundled_teacher(frags, progress: bool):
  """The bundled real base model's next-token distributions (`surrogate teach`)."""
  from calibrate.reference import teacher_of
  try:
    return teacher_of("lm", frags, progress=progress)
  except ImportError as e:
    raise TorchMissing("surrogate demo --calibrate distils the bundled real base model into the "
                      "surrogate, which runs it with torch: pip install 'surrogate-sim[torch]', "
                      f"or add --no-teacher ({e})") from None


def _calibrated(frags, cal, *, seed: int, length: int | None, teacher: bool, progress: bool):
  """The demo's simulator made from the real runs: distilled from the bundled base model
  (`teacher`), calibrated, then its analytic tier fitted and checked on
  `BUNDLED_CHECK_ORDERS` fresh orders."""
  import jax

  from calibrate.fitting import analytic as tier_lib
  from calibrate.fitting.fit import FitConfig, fit
  from calibrate.io.runlog import order_from_runlog
  from calibrate.reference import real_tokenizer
  from surrogate.model import ModelConfig
  from surrogate.prepare import model_config_for

  # Index 0 is unused (fit takes `key(seed)` itself, as before); 3 is the demo's re-check.
  _, k_fit, k_check, _ = jax.random.split(jax.random.key(seed), 4)
  the_teacher = tokenizer = None
  if teacher:
    the_teacher = _bundled_teacher(frags, progress)
    model_cfg, tokenizer = model_config_for(frags, length=length,
                                            real_tokenizer=real_tokenizer("lm"))
  else:
    model_cfg = None if length is None else ModelConfig(length=length)
  sim = fit(frags, cal, model_cfg=model_cfg, config=FitConfig(), key=jax.random.key(seed),
            tokenizer=tokenizer, teacher=the_teacher, progress=progress)
  tier = tier_lib.fit_tier(sim, [order_from_runlog(r, frags) for r in cal], key=k_fit,
                           progress=progress)
  tier = tier_lib.check_fidelity(sim, tier, key=k_check, orders=BUNDLED_CHECK_ORDERS,
                                 progress=progress)
  return dataclasses.replace(sim, analytic=tier)


def _decide(stored, again):
  """The tier as the demo uses it after its own check `again` of the `stored` one.

  A few orders can neither confirm nor overturn a check of 64 (their intervals are wide):
  the stored check decides, unless the new one refutes it — a ratio whose whole 90 %
  interval lies below `TRUST_RATIO` — or there is none."""
  from calibrate.fitting import analytic as tier_lib
  fid = again.fidelity
  refuted = any(hi < tier_lib.TRUST_RATIO for _, hi in fid.ratio_interval or ())
  if stored.fidelity is None or (stored.fidelity.trusted and refuted):
    return again
  this_one = ("agrees" if fid.trusted == stored.fidelity.trusted else
              "does not refute it" if stored.fidelity.trusted else "cannot overturn it")
  print(f"      the stored check of {stored.fidelity.orders} orders decides (this one "
        f"{this_one}): {stored.fidelity.reason.split(':', 1)[0]}")
  return stored


def run_demo(n_orders: int | None = None, out: str = "surrogate-demo", seed: int = 0,
             budget: int = 8, length: int | None = None, progress: bool = True,
             calibrate: bool = False, check: int = CHECK_ORDERS, save_sim: str | None = None,
             tier: str = "auto", teacher: bool = True) -> int:
  """Runs the demo; prints the fragment table, the best order and held-out checks.

  Args:
    n_orders: simulated runs in the screen (half orders, half their counterfactuals; default
      `SCREEN_RUNS` of the tier that answers).
    out: folder for `report.html`, its PNGs, `summary.json` and the best order's file.
    seed: drives the surrogate seeds and every drawn order.
    budget: candidate orders the search simulates (each from every surrogate seed).
    length: the surrogate's context length in tokens (default: fit's, from the data).
    progress: show progress bars.
    calibrate: make the simulator from the real runs instead of loading the bundled one
      (also done whenever `seed` or `length` differ from the bundled simulator's).
    check: fresh orders the demo checks the analytic tier on (0: keep the stored check).
    save_sim: write the simulator used (with its tier) to this folder.
    tier: "auto", "analytic" or "transformer" (`calibrate.fitting.calibration.resolve_tier`).
    teacher: the surrogate distilled from the real base model (the bundled simulator is);
      False calibrates here without it. Calibrating with it needs torch.
  """
  import jax

  from calibrate.answers.report import trajectories_of, write_report
  from calibrate.answers.screen import screen
  from calibrate.answers.search import search
  from calibrate.fitting import analytic as tier_lib
  from calibrate.fitting.calibration import resolve_tier
  from calibrate.fitting.saved import load, save
  from calibrate.fitting.validate import validate_diagnostics
  from calibrate.io.runlog import read_runlog
  from surrogate.fragments import read_fragments
  from surrogate.jsonl import atomic_write, json_safe
  from surrogate.orders import OrderSpec

  t_start = time.perf_counter()
  data = _data_dir()
  frags = read_fragments(os.path.join(data, "fragments.jsonl"))
  read = lambda n: read_runlog(os.path.join(data, "runs", f"{n}.jsonl"), frags)
  cal, held = [read(n) for n in CALIBRATION], [read(n) for n in HELD_OUT]
  print(f"data: {len(frags.examples)} examples in {len(frags.names)} fragments (Debian "
        f"fortunes); real runs: {cal[0].header.model}, {cal[0].num_steps} steps of "
        f"{cal[0].header.batch_size}")
  bundled = bundled_simulator()
  sim = None
  if (not calibrate and seed == 0 and length is None
      and os.path.exists(os.path.join(bundled, "simulator.json"))):
    sim = load(bundled)
    how = f"loaded the bundled simulator ({os.path.relpath(bundled, os.path.dirname(data))})"
    if (sim.fit_info.distillation is not None) != teacher:  # not the simulator asked for
      sim = None
  if sim is None:
    t = time.perf_counter()
    sim = _calibrated(frags, cal, seed=seed, length=length, teacher=teacher, progress=progress)
    how = f"calibrated and fitted its analytic tier in {time.perf_counter() - t:.0f} s"
  if save_sim:
    save(sim, save_sim)
  info = sim.fit_info
  gain, loo = info.gain, info.leave_one_run_out
  print(f"[1/5] {how}: calibrated on {', '.join(CALIBRATION)} (surrogate: "
        f"{sim.model_cfg.length} tokens, {info.lr_scale:g} x the real rate): "
        f"gain {gain.common_gain:.2f} +- {gain.common_gain_sd:.2f}; leave-one-run-out "
        f"MSE {loo.mse:.4f} (order-agnostic mean {loo.order_agnostic_mse:.4f})")
  if (d := info.distillation) is not None:
    print(f"      distilled from the real base model ({d.teacher_model}) for {d.steps} steps "
          f"per seed first: KL to its next tokens {d.kl_before:.2f} -> {d.kl_after:.2f} nats")
  ana = sim.analytic
  if ana is not None:
    print(f"      analytic tier ({ana.form} form) fitted on {ana.fit_orders} simulated orders; "
          f"its check then: {ana.fidelity.reason if ana.fidelity else 'none'}")
  if ana is not None and check > 0 and tier != "transformer":
    t = time.perf_counter()
    # A key of its own: neither the tier's fit orders nor the stored check's.
    again = tier_lib.check_fidelity(sim, ana, key=jax.random.split(jax.random.key(seed), 4)[3],
                                    orders=check, progress=progress)
    verdict, figures = again.fidelity.reason.split(": ", 1)
    print(f"[2/5] checked the analytic tier again on {check} fresh orders x {sim.num_seeds} "
          f"seeds in {time.perf_counter() - t:.0f} s: {figures} (alone: {verdict})")
    ana = _decide(ana, again)
    sim = dataclasses.replace(sim, analytic=ana)
  else:
    print("[2/5] the analytic tier was not checked again")
  used, reason = resolve_tier(sim, tier)
  answering = "transformer" if used is None else "analytic"
  print(f"      answering: {reason}")
  n_orders = SCREEN_RUNS[answering] if n_orders is None else n_orders

  key = jax.random.key(seed)
  t = time.perf_counter()
  sc = screen(sim, n_orders=n_orders, key=key, progress=progress, tier=tier)
  screen_s = time.perf_counter() - t
  print(f"\n[3/5] screened {len(sc.specs)} random orders and their counterfactuals "
        f"({2 * len(sc.specs)} simulated runs) through the {sc.tier} tier in {screen_s:.0f} s: "
        f"{sc.seconds_per_order * 1e3:.3g} ms per simulated order, compilation included")
  print(sc.table())

  # The search starts from the best screened orders (one seed each there) and a shuffle.
  score_P = np.nanmean(sc.probe_PxCxF[:, -1], -1)
  best_screened = [int(p) for p in np.argsort(np.nan_to_num(score_P, nan=np.inf))
                   if sc.specs[p].kind.value != "shuffled"][: max(1, budget // 2 - 1)]
  start = {"shuffled": OrderSpec("shuffled")}
  start.update({f"screened-{p}": sc.specs[p] for p in best_screened})
  t = time.perf_counter()
  result = search(sim, budget=budget, start=start, rounds=1, keep=2, key=key,
                  progress=progress, tier=tier)
  print(f"\n[4/5] searched {len(result.ranked.names)} candidate orders through the "
        f"{result.ranked.tier} tier in {time.perf_counter() - t:.0f} s (each from all "
        f"{sim.num_seeds} surrogate seeds); objective: mean final probe loss")
  print(result.table())
  os.makedirs(out, exist_ok=True)
  result.save_order(sim, os.path.join(out, "best-order.jsonl"), run_id="searched-best")

  t = time.perf_counter()
  plots = trajectories_of(sim, cal + held, progress=progress, tier=tier)
  print(f"\n[5/5] predicted against real through the {answering} tier, {len(held)} real runs "
        f"never used in calibration ({time.perf_counter() - t:.0f} s):")
  print(f"{'run':<24}{'predicted':>10}{'real':>8}{'MSE':>9}  inside 80% interval")
  rows = []
  for p in plots:
    if not p.held_out:
      continue
    pred, real = float(np.nanmean(p.pred_CxF[-1])), float(np.nanmean(p.real_CxF[-1]))
    mse = float(np.nanmean((p.pred_CxF - p.real_CxF) ** 2))
    inside = float(np.nanmean((p.real_CxF >= p.lo_CxF) & (p.real_CxF <= p.hi_CxF)))
    rows.append({"run": p.run_id, "predicted_final": pred, "real_final": real, "mse": mse,
                 "inside_interval": inside})
    print(f"{p.run_id:<24}{pred:10.3f}{real:8.3f}{mse:9.4f}  {inside:.0%}")
  pred_rank = np.argsort(np.argsort([r["predicted_final"] for r in rows]))
  real_rank = np.argsort(np.argsort([r["real_final"] for r in rows]))
  print("(mean final probe loss over fragments; rank of the held-out runs predicted "
        f"{[int(x) + 1 for x in pred_rank]}, real {[int(x) + 1 for x in real_rank]})")

  agree = validate_diagnostics(sim, held)
  print(f"diagnostics against the real model's on these {len(held)} runs (median over fragments "
        "of the Spearman across orders; a coarse check on so few orders, docs/results.md has "
        "the figures on every held-out run): " + ", ".join(
            f"{k} {v['median']:.2f} ({'predicted' if v['predicted'] else 'surrogate-internal'})"
            for k, v in agree.items()))

  notes = [(f"The demo's surrogate reads {sim.model_cfg.length} tokens per example at "
            f"{info.lr_scale:g} x the real learning rate; accuracy figures for it are in "
            "docs/results.md."),
           ("Outcome probabilities come from pairs of an order and its counterfactual; a "
           "fragment with few pairs has a coarse estimate (see the pairs column).")]
  report = write_report(out, sim, screen=sc, search=result, trajectories=plots,
                        validated_diagnostics=agree,
                        title="surrogate demo: pre-screening report", notes=notes)
  summary = {"screen": sc.to_json(), "held_out": rows, "diagnostics_vs_real": json_safe(agree),
             "calibration_runs": list(CALIBRATION),
             "best_order": result.best_spec.to_dict() if result.best_spec else None,
             "search": [{"name": n, "score": float(s)} for n, s in
                        zip(result.ranked.names, result.ranked.score_N)],
             "fit": info.to_json(), "tier": answering, "tier_reason": reason,
             "tier_fidelity": (json_safe(sim.analytic.fidelity.to_json())
                               if sim.analytic is not None and sim.analytic.fidelity else None),
             "seconds_total": time.perf_counter() - t_start}
  atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
  print(f"\nwrote {report}, {out}/summary.json and {out}/best-order.jsonl "
        f"(run it for real: calibrate.io.hf.OrderedTrainer or OrderBatchSampler)")
  print(f"total {time.perf_counter() - t_start:.0f} s")
  return 0
