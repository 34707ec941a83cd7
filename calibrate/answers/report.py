"""The pre-screening report: one self-contained HTML page with PNG plots.

`write_report` takes what the other calls computed (a screen, a search, predicted and real
trajectories of real runs) and writes `report.html`, with every plot embedded as a PNG and
also saved beside it. Plots are drawn with matplotlib's non-interactive Agg backend, so the
report can be written on a headless machine.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import os
from collections.abc import Sequence

import numpy as np

from calibrate.answers.families import (FailurePoint, FamilyView, Interactions, by_family,
                                        failure_points, interactions)
from calibrate.answers.outcomes import OUTCOMES
from calibrate.answers.screen import DIAGNOSTICS, Screen
from calibrate.answers.search import SearchResult
from calibrate.fitting.calibration import Simulator, fragment_means, predict, schedule
from calibrate.fitting.runs import check_compatible
from calibrate.fitting.validate import ValidationReport
from calibrate.io.runlog import RunLog, order_from_runlog, where
from calibrate.io.simulated import check_not_empty
from surrogate.errors import CalibrationError
from surrogate.jsonl import atomic_write

__all__ = ["TrajectoryPlot", "plot_by_family", "trajectories_of", "write_report"]

_OUTCOME_COLORS = ("#d62728", "#2ca02c", "#ff7f0e", "#7f7f7f")


@dataclasses.dataclass(frozen=True)
class TrajectoryPlot:
  """Predicted and real per-fragment probe loss of one real run.

  Attributes:
    run_id: the run.
    steps: the C eval steps.
    real_CxF: the real mean probe loss per fragment.
    pred_CxF, lo_CxF, hi_CxF: the predicted mean and its interval.
    held_out: whether the run was kept out of calibration.
  """
  run_id: str
  steps: np.ndarray
  real_CxF: np.ndarray
  pred_CxF: np.ndarray
  lo_CxF: np.ndarray
  hi_CxF: np.ndarray
  held_out: bool


def trajectories_of(sim: Simulator, runs: Sequence[RunLog], *, level: float = 0.8,
                    chunk_size: int | None = None, progress: bool = False,
                    tier: str = "transformer") -> list[TrajectoryPlot]:
  """Predicts `runs` (real runs with evals at the calibration steps) for the report.

  The interval is normal, from the members' spread and the calibration residual of each
  fragment mean. `chunk_size` only matters for speed (see `calibrate.answers.search.evaluate`);
  `tier` picks the model that predicts (`calibrate.fitting.calibration.predict`).
  """
  check_not_empty(runs)
  check_compatible(sim, runs)
  for r in runs:
    if r.num_steps != sim.num_steps:
      raise CalibrationError(f"{where(r)} has {r.num_steps} steps; the report plots runs as long "
                             f"as the calibration runs ({sim.num_steps} steps)")
  orders = np.stack([order_from_runlog(r, sim.fragments) for r in runs])
  prediction, _ = predict(sim, orders, schedule(sim), sim.steps_C, chunk_size=chunk_size,
                          progress=progress, tier=tier)
  pred = fragment_means(sim, prediction.members_NxKxCxM)            # R K C F
  with np.errstate(invalid="ignore"):
    q = (1 - level) / 2
    sd = np.sqrt(np.nanvar(pred, 1) + sim.calibration.fragment_sd_CxF[None] ** 2)
    mean = np.nanmean(pred, 1)
  from scipy.stats import norm
  z = norm.ppf(1 - q)
  cal = set(sim.fit_info.calibration_runs)
  out = []
  for r, run in enumerate(runs):
    by_step = {ev.step: ev.losses for ev in run.evals}
    real_CxM = np.array([[by_step[int(s)].get(i, np.nan) for i in sim.eval_ids]
                         if int(s) in by_step else [np.nan] * len(sim.eval_ids)
                         for s in sim.steps_C], np.float64)
    real = fragment_means(sim, real_CxM)
    out.append(TrajectoryPlot(run.header.run_id, np.asarray(sim.steps_C), real, mean[r],
                              mean[r] - z * sd[r], mean[r] + z * sd[r],
                              run.header.run_id not in cal))
  return out


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  import matplotlib.pyplot as plt
  plt.close(fig)
  return buf.getvalue()


def _grid(n: int):
  import matplotlib.pyplot as plt
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False,
                           layout="constrained")
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, axes.flat


def plot_trajectories(plots: Sequence[TrajectoryPlot], fragments: Sequence[str]) -> bytes:
  """Small multiples, one per fragment: real (solid) and predicted (dashed, band) per run."""
  import matplotlib.pyplot as plt
  fig, axes = _grid(len(fragments))
  colors = plt.get_cmap("tab10")
  for f, name in enumerate(fragments):
    ax = axes[f]
    for r, p in enumerate(plots):
      c = colors(r % 10)
      ax.plot(p.steps, p.real_CxF[:, f], color=c, lw=1.5,
              label=f"{p.run_id} real" + (" (held out)" if p.held_out else ""))
      ax.plot(p.steps, p.pred_CxF[:, f], color=c, lw=1.2, ls="--", label=f"{p.run_id} predicted")
      ax.fill_between(p.steps, p.lo_CxF[:, f], p.hi_CxF[:, f], color=c, alpha=0.12, lw=0)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=6, loc="upper right")
  fig.supxlabel("step", fontsize=9)
  fig.supylabel("mean probe loss", fontsize=9)
  return _png(fig)


def plot_outcomes(sc: Screen) -> bytes:
  """Stacked bars: each fragment's probability of each outcome."""
  import matplotlib.pyplot as plt
  f = len(sc.fragments)
  fig, ax = plt.subplots(figsize=(7, 0.32 * f + 1.2))
  left = np.zeros(f)
  probs = np.nan_to_num(sc.outcome_FxO)
  y = np.arange(f)[::-1]
  for o, outcome in enumerate(OUTCOMES):
    ax.barh(y, probs[:, o], left=left, color=_OUTCOME_COLORS[o], label=outcome.value)
    left += probs[:, o]
  ax.set_yticks(y, sc.fragments, fontsize=8)
  ax.set_xlim(0, 1)
  ax.set_xlabel("probability over screened orders and the ensemble")
  ax.legend(ncol=4, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0))
  return _png(fig)


def plot_interference(sc: Screen) -> bytes:
  """Heatmap: row i, column j, the relative change of j's final probe loss from feeding i."""
  import matplotlib.pyplot as plt
  m = sc.interference_FxF * 100
  lim = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0, 1e-6)
  f = len(sc.fragments)
  fig, ax = plt.subplots(figsize=(0.42 * f + 2.5, 0.42 * f + 1.5))
  im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
  ax.set_xticks(range(f), sc.fragments, rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(f), sc.fragments, fontsize=7)
  ax.set_xlabel("fragment j (affected)")
  ax.set_ylabel("fragment i (fed)")
  fig.colorbar(im, ax=ax, label="% lower final probe loss of j from feeding i")
  return _png(fig)


def plot_diagnostics(sc: Screen) -> bytes:
  """One panel per diagnostic: its mean trajectory over the screened orders, per fragment."""
  import matplotlib.pyplot as plt
  names = [n for n in (*DIAGNOSTICS, "entropy") if n in sc.diagnostics]
  fig, axes = _grid(len(names))
  colors = plt.get_cmap("tab20")
  for k, name in enumerate(names):
    ax = axes[k]
    v = np.nanmean(sc.diagnostics[name], 0)
    for f, frag in enumerate(sc.fragments):
      ax.plot(sc.steps, v[:, f], color=colors(f % 20), lw=1, label=frag)
    ax.set_title(name.replace("_", " "), fontsize=9)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=5, ncol=2)
  fig.supxlabel("step", fontsize=9)
  return _png(fig)


# The by-family view's panels: the measures a user compares families on.
_FAMILY_PANELS = ("probe_drop", "own_contribution", "P(generalizes)", "P(forgotten at the end)",
                  "starved", *DIAGNOSTICS)


def plot_by_family(view: FamilyView) -> bytes:
  """One heatmap per measure: fragments (rows) x families (columns), the family's change from
  shuffling (a dot where its interval excludes zero); the mean itself when no shuffled order
  was screened. Diagnostics not validated against real runs say so in their title."""
  import matplotlib.pyplot as plt
  names = [n for n in _FAMILY_PANELS if n in view.measures]
  diff = bool(view.vs_shuffled)
  cols = [k for k, f in enumerate(view.families) if not diff or f != "shuffled"]
  num_f = len(view.fragments)
  ncols = min(len(names), 5)
  nrows = -(-len(names) // ncols)
  fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                           figsize=(0.42 * len(cols) * ncols + 2.2, (0.2 * num_f + 1.3) * nrows))
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  for n, name in enumerate(names):
    ax = axes.flat[n]
    est = (view.vs_shuffled if diff else view.measures)[name]
    m = est.mean_KxF[cols].T                                   # F K'
    finite = np.isfinite(m)
    lim = float(np.abs(m[finite]).max()) if finite.any() else 0.0
    lim = lim if lim > 1e-12 else 1.0   # an all-zero panel: no offset text on its bar
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r" if diff else "viridis",
                   vmin=-lim if diff else None, vmax=lim if diff else None, aspect="auto")
    yy, xx = np.nonzero(est.clear_KxF()[cols].T) if diff else ((), ())
    ax.scatter(xx, yy, s=5, c="k")
    ax.set_xticks(range(len(cols)), [view.families[k] for k in cols], rotation=60,
                  ha="right", fontsize=6)
    ax.set_yticks(range(num_f), view.fragments if n % ncols == 0 else [""] * num_f, fontsize=6)
    status = view.status.get(name, "")
    tag = ("" if not status else "\n(real: validated)" if status.startswith("predicts")
           else "\n(surrogate-internal)")
    ax.set_title(name.replace("_", " ") + tag, fontsize=7)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.ax.tick_params(labelsize=5)
  fig.suptitle(("change from shuffling, per fragment (dot: its "
                f"{view.level:.0%} interval excludes 0)") if diff else
               "mean per family and fragment", fontsize=8)
  return _png(fig)


def _family_section(view: FamilyView, fails: Sequence[FailurePoint], inter: Interactions,
                    figure) -> str:
  """The report's by-family section: the heatmaps, the diagnostics' status, the failure
  points with their steps and what the interference matrix says."""
  out = ("<h2>By feeding type</h2>"
         + figure("by_family.png", plot_by_family(view),
                  "What each order family does to each fragment compared with shuffling "
                  f"({', '.join(f'{f}: {n}' for f, n in zip(view.families, view.orders_K))} "
                  "orders screened)."))
  out += _table(["diagnostic", "status"], [[k.replace("_", " "), v] for k, v in
                                            view.status.items()])
  out += "<h3>Failure points</h3>" + (_table(
      ["fragment", "failure", "share of orders", "onset step (median)", "10%-90%",
       "most common in", "share there"],
      [[p.fragment, p.kind, f"{p.share:.0%} of {p.orders}", f"{p.step:.0f}",
        f"{p.step_lo:.0f}-{p.step_hi:.0f}", p.worst_family, f"{p.worst_share:.0%}"]
       for p in fails]) if fails else "<p>None in the screened orders.</p>")
  out += "<h3>Fragments acting on each other</h3><pre>" + html.escape(inter.table()) + "</pre>"
  return out


def plot_ranking(result: SearchResult, top: int = 10) -> bytes:
  """The best candidates' predicted objective with the ensemble's interval."""
  import matplotlib.pyplot as plt
  n = min(top, len(result.ranked.names))
  fig, ax = plt.subplots(figsize=(7, 0.35 * n + 1.2))
  y = np.arange(n)[::-1]
  lo_hi = np.array([result.interval(i) for i in range(n)])
  score = result.ranked.score_N[:n]
  ax.errorbar(score, y, xerr=[score - lo_hi[:, 0], lo_hi[:, 1] - score], fmt="o", capsize=3)
  ax.set_yticks(y, result.ranked.names[:n], fontsize=8)
  ax.set_xlabel(f"predicted objective (lower is better; {result.level:.0%} over the ensemble)")
  return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                 for r in rows)
  return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _validation_section(report: ValidationReport) -> str:
  sim = report.methods["simulator"]
  rows = [[k.replace("_", " "), _num(v)] for k, v in {**sim, **report.ceiling}.items()]
  out = (f"<h2>Validated on {len(report.run_ids)} held-out real runs</h2>"
         + _table(["figure (DESIGN.md's metrics)", "simulator"], rows))
  if report.diagnostics:
    n = next(iter(report.diagnostics.values()))["orders"]
    out += (f"<h3>Diagnostics: surrogate against the real model across {n} held-out orders</h3>"
            + _table(["diagnostic", "median Spearman over fragments", "two real seeds",
                      "status"],
                     [[k.replace("_", " "), _num(v["median"]), _num(v["seed_to_seed"]),
                       "predicted" if v["predicted"] else "surrogate-internal"]
                      for k, v in report.diagnostics.items()]))
  for fam in report.verdicts:
    figs, seed = fam["simulator"], fam["seed_to_seed"]
    names = [k for k in figs if k != "fragments"]
    out += (f"<h3>Verdicts on the real counterfactual family of {html.escape(fam['base'])}"
            f" ({len(fam['fragments'])} fragments left out one at a time)</h3>"
            + _table(["figure", "simulator", "two real seeds"],
                     [[k.replace("_", " "), _num(figs[k]), _num(seed.get(k, float("nan")))]
                      for k in names]))
  return out


def _num(v: float) -> str:
  return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def write_report(path: str | os.PathLike, sim: Simulator, *, screen: Screen | None = None,
                 search: SearchResult | None = None,
                 trajectories: Sequence[TrajectoryPlot] = (),
                 validation: ValidationReport | None = None,
                 validated_diagnostics: dict | None = None,
                 title: str = "Pre-screening report", notes: Sequence[str] = ()) -> str:
  """Writes `report.html` and its PNGs into the folder `path`; returns the HTML's path.

  `validation` (from `calibrate.fitting.validate.validate` on held-out real runs) adds its
  figures, and the verdicts of any counterfactual family among the runs. The screen's
  diagnostics are labelled as predictions of the real model or surrogate-internal by
  `validated_diagnostics` (`validate_diagnostics`'s result), else by `validation`'s."""
  os.makedirs(path, exist_ok=True)
  sections, images = [], {}

  def figure(name: str, png: bytes, caption: str) -> str:
    images[name] = png
    b64 = base64.b64encode(png).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")

  info = sim.fit_info
  loo = info.leave_one_run_out
  sections.append("<h2>Simulator</h2>" + _table(
      ["calibration runs", "surrogate", "seeds", "common gain", "fit MSE",
       "leave-one-run-out MSE (order-agnostic)", "fit seconds"],
      [[", ".join(info.calibration_runs),
        f"{sim.model_cfg.depth}x{sim.model_cfg.width}, {sim.model_cfg.length} tokens",
        sim.num_seeds, f"{info.gain.common_gain:.2f}", f"{info.fit_mse:.4g}",
        "n/a (one run)" if loo is None else f"{loo.mse:.4g} ({loo.order_agnostic_mse:.4g})",
        f"{info.seconds.total:.0f}"]]))
  if trajectories:
    sections.append("<h2>Predicted against real trajectories</h2>" + figure(
        "trajectories.png", plot_trajectories(trajectories, sim.fragments.names),
        "Per fragment: real mean probe loss (solid) and the prediction (dashed, with its "
        "interval) for each real run."))
    rows = []
    for p in trajectories:
      err = np.nanmean((p.pred_CxF - p.real_CxF) ** 2)
      cover = np.nanmean((p.real_CxF >= p.lo_CxF) & (p.real_CxF <= p.hi_CxF))
      rows.append([p.run_id, "held out" if p.held_out else "calibration", f"{err:.4g}",
                   f"{cover:.0%}"])
    sections.append(_table(["run", "role", "MSE (probe, per fragment)", "inside interval"], rows))
  if validation is not None:
    sections.append(_validation_section(validation))
  if screen is not None:
    pct = lambda x, fmt=".0%": "-" if not np.isfinite(x) else format(x, fmt)
    rows = [[name, *(pct(p) for p in screen.outcome_FxO[f]),
             pct(screen.gain_F[f], ".1%"), pct(screen.own_probe_F[f], "+.1%"),
             pct(screen.starved_F[f]), pct(screen.collapsed_F[f]), int(screen.pairs_F[f])]
            for f, name in enumerate(screen.fragments)]
    sections.append(
        f"<h2>Screen: {len(screen.specs)} orders, each with a counterfactual</h2>"
        + _table(["fragment", *(o.value for o in OUTCOMES), "probe drop", "own contribution",
                  "starved", "collapsed", "pairs"], rows)
        + figure("outcomes.png", plot_outcomes(screen), "Outcome probabilities per fragment.")
        + figure("interference.png", plot_interference(screen),
                 "Interference: how feeding fragment i changes fragment j's final probe loss.")
        + (figure("diagnostics.png", plot_diagnostics(screen),
                  "The diagnostics, averaged over the screened orders (surrogate scale).")
           if screen.diagnostics else ""))
    sections.append(_family_section(
        by_family(screen, validated=validated_diagnostics if validated_diagnostics is not None
                  else None if validation is None else validation.diagnostics),
        failure_points(screen), interactions(screen), figure))
    if screen.diverged:
      sections.append(f"<p>{len(screen.diverged)} simulated orders diverged.</p>")
  if search is not None:
    sections.append("<h2>Order search</h2><pre>" + html.escape(search.table()) + "</pre>"
                    + figure("ranking.png", plot_ranking(search),
                             "The best candidate orders with the ensemble's interval."))
  if notes:
    sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                    + "</ul>")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #555; }}
pre {{ font-size: 0.8em; background: #f6f6f6; padding: 0.6em; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Data set: {len(sim.fragments.names)} fragments, {len(sim.fragments.examples)} examples
(sha256 {sim.fragments.sha256[:12]}&hellip;). Written {stamp} by surrogate.</p>
{"".join(sections)}
</body></html>
"""
  for name, png in images.items():
    atomic_write(os.path.join(path, name), png)
  out = os.path.join(path, "report.html")
  atomic_write(out, page.encode())
  return out
