"""`surrogate demo`: the whole job on the bundled real runs, in a few minutes.

The bundled set (`calibrate/reference/data/lm`) holds 24 real fine-tunes of a small GPT-2
on 12 fragments of text from Debian's `fortunes` (made by `calibrate.reference`). The demo:

1. calibrates the surrogate ensemble on four of them (two shuffled runs, one blocked and one
   subset run: structured runs pin the gain map);
2. screens random feeding orders, each with its counterfactual, and prints per fragment the
   probability of each outcome, the expected probe-loss drop and the failure points;
3. searches for the best order, starting from the best screened ones;
4. shows predicted against real probe losses for real runs it never saw;
5. writes the report (HTML and PNGs) and a JSON summary.

The demo uses fit's default surrogate (64 tokens per example on this data, at three times the
real rate), whose accuracy docs/results.md reports; to stay near ten minutes on a 2-core CPU it
screens 128 simulated runs (64 orders and their counterfactuals), so its outcome probabilities
are coarse.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

CALIBRATION = ("shuffled-s0", "shuffled-s1", "blocked-p1", "subset-1")
HELD_OUT = ("blocked-p0", "interleaved", "mixture-skewed", "curriculum-easy-hard")


def _data_dir() -> str:
  import calibrate
  return os.path.join(os.path.dirname(calibrate.__file__), "reference", "data", "lm")


def run_demo(n_orders: int = 128, out: str = "surrogate-demo", seed: int = 0,
             budget: int = 8, length: int | None = None, progress: bool = True) -> int:
  """Runs the demo; prints the fragment table, the best order and held-out checks.

  Args:
    n_orders: simulated runs in the screen (half orders, half their counterfactuals).
    out: folder for `report.html`, its PNGs, `summary.json` and the best order's file.
    seed: drives the surrogate seeds and every drawn order.
    budget: candidate orders the search simulates (each from every surrogate seed).
    length: the surrogate's context length in tokens (default: fit's, from the data).
    progress: show progress bars.
  """
  import jax

  from calibrate.answers.report import trajectories_of, write_report
  from calibrate.answers.screen import screen
  from calibrate.answers.search import search
  from calibrate.fitting.fit import FitConfig, fit
  from calibrate.fitting.validate import validate_diagnostics
  from calibrate.io.runlog import read_runlog
  from surrogate.fragments import read_fragments
  from surrogate.jsonl import atomic_write, json_safe
  from surrogate.model import ModelConfig
  from surrogate.orders import OrderSpec

  t_start = time.perf_counter()
  data = _data_dir()
  frags = read_fragments(os.path.join(data, "fragments.jsonl"))
  read = lambda n: read_runlog(os.path.join(data, "runs", f"{n}.jsonl"), frags)
  cal, held = [read(n) for n in CALIBRATION], [read(n) for n in HELD_OUT]
  print(f"data: {len(frags.examples)} examples in {len(frags.names)} fragments (Debian "
        f"fortunes); real runs: {cal[0].header.model}, {cal[0].num_steps} steps of "
        f"{cal[0].header.batch_size}")
  model_cfg = None if length is None else ModelConfig(length=length)
  sim = fit(frags, cal, model_cfg=model_cfg, config=FitConfig(), key=jax.random.key(seed),
            progress=progress)
  info = sim.fit_info
  gain, loo = info.gain, info.leave_one_run_out
  print(f"[1/4] calibrated on {', '.join(CALIBRATION)} in {info.seconds.total:.0f} s "
        f"(surrogate: {sim.model_cfg.length} tokens, {info.lr_scale:g} x the real rate): "
        f"gain {gain.common_gain:.2f} +- {gain.common_gain_sd:.2f}; leave-one-run-out "
        f"MSE {loo.mse:.4f} (order-agnostic mean {loo.order_agnostic_mse:.4f})")

  key = jax.random.key(seed)
  t = time.perf_counter()
  sc = screen(sim, n_orders=n_orders, key=key, progress=progress)
  screen_s = time.perf_counter() - t
  print(f"\n[2/4] screened {len(sc.specs)} random orders and their counterfactuals "
        f"({2 * len(sc.specs)} simulated runs) in {screen_s:.0f} s: "
        f"{sc.seconds_per_order:.2f} s per simulated order, compilation included")
  print(sc.table())

  # The search starts from the best screened orders (one seed each there) and a shuffle.
  score_P = np.nanmean(sc.probe_PxCxF[:, -1], -1)
  best_screened = [int(p) for p in np.argsort(np.nan_to_num(score_P, nan=np.inf))
                   if sc.specs[p].kind.value != "shuffled"][: max(1, budget // 2 - 1)]
  start = {"shuffled": OrderSpec("shuffled")}
  start.update({f"screened-{p}": sc.specs[p] for p in best_screened})
  t = time.perf_counter()
  result = search(sim, budget=budget, start=start, rounds=1, keep=2, key=key,
                  progress=progress)
  print(f"\n[3/4] searched {len(result.ranked.names)} candidate orders in "
        f"{time.perf_counter() - t:.0f} s (each from all {sim.num_seeds} surrogate seeds); "
        "objective: mean final probe loss")
  print(result.table())
  os.makedirs(out, exist_ok=True)
  result.save_order(sim, os.path.join(out, "best-order.jsonl"), run_id="searched-best")

  t = time.perf_counter()
  plots = trajectories_of(sim, cal + held, progress=progress)
  print(f"\n[4/4] predicted against real, {len(held)} real runs never used in calibration "
        f"({time.perf_counter() - t:.0f} s):")
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
             "fit": info.to_json(), "seconds_total": time.perf_counter() - t_start}
  atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
  print(f"\nwrote {report}, {out}/summary.json and {out}/best-order.jsonl "
        f"(run it for real: calibrate.io.hf.OrderedTrainer or OrderBatchSampler)")
  print(f"total {time.perf_counter() - t_start:.0f} s")
  return 0
