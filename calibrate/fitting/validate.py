"""`validate`: how well a calibrated simulator predicts real runs it never saw.

Computes DESIGN.md's accuracy metrics on held-out real runs for the simulator and, beside it,
the baselines fitted on the same calibration runs: the order-agnostic mean trajectory,
Simfluence-linear, and the surrogate without calibration (its own loss scale, which only the
rank metrics can judge fairly). Runs with identical batches but different seeds are re-runs:
the first stands for its order, and the pairs give the noise ceiling of decision accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from calibrate.fitting import metrics
from calibrate.fitting.baselines import fragment_shares
from calibrate.fitting import verdicts
from calibrate.fitting.calibration import Simulator, maps_at, predict
from calibrate.fitting.runs import predict_runs
from calibrate.io.runlog import (DIAGNOSTIC_NAMES, RunLog, diagnostics_arrays,
                                 order_from_runlog, run_learning_rates, where)
from surrogate.errors import CalibrationError
from surrogate.jsonl import json_safe
from surrogate.orders import order_sha256

METHODS = ("simulator", "analytic_tier", "order_agnostic", "simfluence_linear",
           "uncalibrated_surrogate")


@dataclasses.dataclass(frozen=True)
class ValidationReport:
  """Accuracy figures on held-out real runs.

  Attributes:
    run_ids: the held-out orders judged (one run per distinct order).
    reruns: (run, re-run) id pairs used for the noise ceiling.
    methods: method name -> metric name -> value (see `format_table` for the metrics).
    ceiling: the noise ceiling (decision accuracies between real seeds) and the simulator's
      accuracy on the same pairs, and an estimate of the per-fragment ceiling over all pairs
      of held-out orders from the seeds' spread (`metrics.expected_seed_agreement`).
    interval: the nominal level of the predictive intervals whose coverage is reported.
    decisions_by_kind: the simulator's per-fragment decision accuracy over the pairs of
      orders of each two kinds ("blocked/subset": pairs, accuracy), where the runs' headers
      name their order kind (`order_spec.kind`, as `surrogate orders` writes it); empty
      otherwise.
    decisions_by_margin: the simulator's per-fragment decision accuracy over all pairs,
      split by the real margin in units of seed noise, beside the ceiling in each band
      (`metrics.decisions_by_margin`); empty without re-runs.
    verdicts: one entry per counterfactual family among the runs
      (`verdicts.score_families`): own contributions, outcome labels and interference,
      the simulator's figures beside two real seeds' and the dilution-only baseline.
    diagnostics: diagnostic name -> `metrics.diagnostic_agreement` of the surrogate's final
      diagnostics with the real ones across the held-out orders whose evals carry them
      (`validate_diagnostics`), plus `orders`; empty when fewer than 3 orders do.
  """
  run_ids: tuple[str, ...]
  reruns: tuple[tuple[str, str], ...]
  methods: dict[str, dict[str, float]]
  ceiling: dict[str, float]
  interval: float
  decisions_by_kind: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  decisions_by_margin: list[dict[str, float]] = dataclasses.field(default_factory=list)
  verdicts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  diagnostics: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    """The figures as strict JSON, a missing figure (NaN) as null."""
    return json.dumps(json_safe(self.to_dict()), indent=1, allow_nan=False)

  def format_table(self) -> str:
    """A table for people: one row per metric, one column per method."""
    names = ["trajectory_mse", "trajectory_mse_ratio", "trajectory_spearman",
             "final_spearman", "kendall_tau", "decision_accuracy", "order_decision_accuracy",
             "auroc_better_than_median", "coverage"]
    cols = [m for m in METHODS if m in self.methods]
    width = max(len(n) for n in names) + 2
    lines = [(f"held-out orders: {len(self.run_ids)}; re-run pairs for the ceiling: "
              f"{len(self.reruns)}"),
             "metric".ljust(width) + "".join(c[:18].rjust(20) for c in cols)]
    for n in names:
      row = [self.methods[c].get(n, float("nan")) for c in cols]
      lines.append(n.ljust(width) + "".join(_fmt(v).rjust(20) for v in row))
    if self.ceiling:
      lines.append("")
      for k, v in self.ceiling.items():
        lines.append(f"{k}: {_fmt(v)}")
    if self.decisions_by_kind:
      lines += ["", "simulator's per-fragment decision accuracy by kinds of the two orders:"]
      lines += [f"  {k:<26}{int(v['pairs']):>5} pairs  {_fmt(v['accuracy'])}"
                for k, v in self.decisions_by_kind.items()]
    if self.decisions_by_margin:
      lines += ["", ("simulator's per-fragment decision accuracy by the real margin "
                     "(|difference| in seed-noise sd):")]
      lines += [f"  {_band(b):<26}{b['decisions']:>5} decisions  {_fmt(b['accuracy'])}  "
                f"(ceiling {_fmt(b['ceiling'])})" for b in self.decisions_by_margin]
    for fam in self.verdicts:
      lines += ["", verdicts.format_family(fam)]
    if self.diagnostics:
      n = next(iter(self.diagnostics.values()))["orders"]
      lines += ["", (f"diagnostics, surrogate vs real (median over fragments of Spearman "
                     f"across {n} orders; predicted at >= {metrics.DIAGNOSTIC_AGREEMENT_BAR}):")]
      lines += [f"  {k:<18}{_fmt(v['median'])}  "
                f"{'predicted' if v['predicted'] else 'surrogate-internal'}"
                f"  (two real seeds: {_fmt(v['seed_to_seed'])})"
                for k, v in self.diagnostics.items()]
    return "\n".join(lines)


def _band(b: dict[str, float]) -> str:
  return f">= {b['lo']:g}" if not np.isfinite(b["hi"]) else f"{b['lo']:g} to {b['hi']:g}"


def _fmt(v: float) -> str:
  return "-" if v is None or not np.isfinite(v) else f"{v:.4f}"


def group_reruns(runs: Sequence[RunLog]) -> tuple[list[int], list[tuple[int, int]]]:
  """Splits runs into one representative per distinct order and (representative, re-run).

  Runs are re-runs of one another when their batches, optimizer settings and logged
  learning rates are all the same and only the seed differs. A run that repeats another
  with the same seed too is a duplicate and is left out of both lists.
  """
  first: dict[tuple, int] = {}
  reps, pairs = [], []
  for i, r in enumerate(runs):
    key = _order_key(r)
    if key in first:
      if runs[first[key]].header.seed != r.header.seed:
        pairs.append((first[key], i))
    else:
      first[key] = i
      reps.append(i)
  return reps, pairs


def _order_key(r: RunLog) -> tuple:
  """What makes two runs the same order (`group_reruns`)."""
  return (tuple(s.examples for s in r.steps), json.dumps(r.header.optimizer, sort_keys=True),
          tuple(s.lr for s in r.steps))


def _order_kind(run: RunLog) -> str | None:
  spec = run.header.extra.get("order_spec")
  kind = spec.get("kind") if isinstance(spec, dict) else None
  return kind if isinstance(kind, str) else None


def _decisions_by_kind(runs: Sequence[RunLog], pred_RxF, real_RxF) -> dict[str, dict[str, float]]:
  """Per-fragment decision accuracy over the order pairs of each two kinds (empty when a
  run's kind is unknown)."""
  kinds = [_order_kind(r) for r in runs]
  if None in kinds:
    return {}
  groups: dict[str, list[tuple[int, int]]] = {}
  for a, b in itertools.combinations(range(len(runs)), 2):
    groups.setdefault("/".join(sorted((kinds[a], kinds[b]))), []).append((a, b))
  return {k: {"pairs": len(p), "accuracy": metrics.decision_accuracy(pred_RxF, real_RxF, p)}
          for k, p in sorted(groups.items())}


def _fragment_probe(sim: Simulator, losses_RxCxM, frag_M, probe_M):
  return metrics.fragment_means(losses_RxCxM, frag_M, probe_M, len(sim.fragments.names))


def _scores(pred_RxCxF, real_RxCxF, baseline_mse=None) -> dict[str, float]:
  later = slice(1, None)  # step 0 is the shared start, known to every method but the raw one
  traj = metrics.trajectory_fidelity(pred_RxCxF[:, later], real_RxCxF[:, later])
  final_p, final_r = pred_RxCxF[:, -1], real_RxCxF[:, -1]
  rank = metrics.counterfactual_rank(final_p, final_r)
  drop_p = (pred_RxCxF[:, 0] - final_p) / pred_RxCxF[:, 0]
  drop_r = (real_RxCxF[:, 0] - final_r) / real_RxCxF[:, 0]
  out = {"trajectory_mse": traj["mse"], "trajectory_spearman": traj["spearman"],
         "final_spearman": rank["spearman"], "kendall_tau": rank["kendall_tau"],
         "decision_accuracy": metrics.decision_accuracy(final_p, final_r),
         "order_decision_accuracy": metrics.order_decision_accuracy(final_p, final_r),
         "auroc_better_than_median": metrics.better_than_median_auroc(drop_p, drop_r)}
  if baseline_mse:
    out["trajectory_mse_ratio"] = traj["mse"] / baseline_mse
  return out


def validate(sim: Simulator, runs: Sequence[RunLog], *, level: float = 0.8,
             progress: bool = False) -> ValidationReport:
  """Scores `sim` and the baselines on held-out real runs (never the calibration runs).

  Args:
    sim: a calibrated simulator.
    runs: held-out real runs with evals of every probe, all at the same eval steps. Re-runs
      (same batches, another seed) give the noise ceiling.
    level: the nominal level of the intervals whose coverage is measured.
    progress: show a progress bar while simulating.

  Raises:
    CalibrationError: a run is a calibration run, has no evals, or the runs cannot be compared.
  """
  cal = set(sim.fit_info.calibration_runs)
  cal_orders = set(sim.fit_info.calibration_orders_sha256)
  for r in runs:
    if r.is_order_file:
      raise CalibrationError(f"{where(r)} has no evals: nothing to validate against")
    if r.header.run_id in cal:
      raise CalibrationError(f"{where(r)} was used to calibrate the simulator; "
                             "validate on held-out runs only")
    if order_sha256(order_from_runlog(r, sim.fragments)) in cal_orders:
      raise CalibrationError(f"{where(r)} feeds exactly the batches of a "
                             "calibration run; validate on held-out orders only")
  found = verdicts.families(runs, sim.fragments)  # malformed headers fail before simulating
  reps, pairs = group_reruns(runs)
  if len(reps) < 2:
    raise CalibrationError("validation needs at least two held-out runs with different orders")
  held = [runs[i] for i in reps]
  pred = predict_runs(sim, held, progress=progress)
  ids, frag_M, probe_M = pred.eval_ids, pred.frag_M, pred.is_probe_M
  steps = pred.steps
  num_f = len(sim.fragments.names)
  # Only probe losses are scored, so only they are required of the held-out runs.
  probe_ids = [i for i, p in zip(ids, probe_M) if p]
  all_probe = np.ones(len(probe_ids), bool)

  def real_probe(rs):
    return metrics.fragment_means(verdicts.real_losses(rs, steps, probe_ids), frag_M[probe_M],
                                  all_probe, num_f)

  real_f = real_probe(held)

  mean_f = _fragment_probe(sim, pred.mean_NxCxM, frag_M, probe_M)
  anchor = maps_at(sim, steps, ids).anchor_CxM
  agnostic_f = np.broadcast_to(_fragment_probe(sim, anchor, frag_M, probe_M), real_f.shape)
  lr_ref = sim.fit_info.baselines.lr_ref
  simfluence_f = []
  for r in held:
    shares = fragment_shares(order_from_runlog(r, sim.fragments), run_learning_rates(r),
                             sim.fragments.fragment_of, num_f, steps, lr_ref)
    simfluence_f.append(sim.simfluence.predict(agnostic_f[0, 0], shares))
  with np.errstate(invalid="ignore"):
    raw_f = _fragment_probe(sim, np.nanmean(pred.raw_NxSxCxM, 1), frag_M, probe_M)

  base_mse = float(np.mean((agnostic_f[:, 1:] - real_f[:, 1:]) ** 2))
  methods = {"simulator": _scores(mean_f, real_f, base_mse),
             "order_agnostic": _scores(agnostic_f, real_f, base_mse),
             "simfluence_linear": _scores(np.array(simfluence_f), real_f, base_mse),
             "uncalibrated_surrogate": _scores(raw_f, real_f, base_mse)}
  # An order-agnostic prediction ranks nothing: its rank figures are chance by definition.
  for k in ("final_spearman", "kendall_tau", "trajectory_spearman"):
    methods["order_agnostic"][k] = float("nan")
  lo, hi = pred.interval(lambda x: metrics.fragment_means(x, frag_M, probe_M, num_f),
                         level=level)
  methods["simulator"]["coverage"] = metrics.coverage(lo[:, 1:], hi[:, 1:], real_f[:, 1:])
  methods["simulator"]["coverage_final"] = metrics.coverage(lo[:, -1], hi[:, -1], real_f[:, -1])
  if sim.analytic is not None:  # scored beside the transformer, whatever its trust check said
    ana = predict_runs(sim, held, tier="analytic")
    methods["analytic_tier"] = _scores(_fragment_probe(sim, ana.mean_NxCxM, frag_M, probe_M),
                                       real_f, base_mse)
    lo, hi = ana.interval(lambda x: metrics.fragment_means(x, frag_M, probe_M, num_f),
                          level=level)
    methods["analytic_tier"]["coverage"] = metrics.coverage(lo[:, 1:], hi[:, 1:], real_f[:, 1:])

  ceiling: dict[str, float] = {}
  rerun_ids: list[tuple[str, str]] = []
  by_margin: list[dict[str, float]] = []
  if len(pairs) >= 2:
    rerun_ids = [(runs[a].header.run_id, runs[b].header.run_id) for a, b in pairs]
    again = real_probe([runs[b] for _, b in pairs])[:, -1]
    pos = [reps.index(a) for a, _ in pairs]
    first = real_f[pos, -1]
    order_pairs = list(itertools.combinations(range(len(pairs)), 2))
    seed_var_F = np.nanmean((again - first) ** 2, 0) / 2
    ceiling = {
        "ceiling_decision_accuracy": metrics.decision_accuracy(again, first, order_pairs),
        "ceiling_order_decision_accuracy": metrics.order_decision_accuracy(again, first,
                                                                           order_pairs),
        "simulator_decision_accuracy_same_pairs": metrics.decision_accuracy(
            mean_f[pos, -1], first, order_pairs),
        # The re-run orders' pairs may differ more than most: an estimate for all pairs.
        "ceiling_decision_accuracy_all_pairs_estimate": metrics.expected_seed_agreement(
            real_f[:, -1], seed_var_F),
        "seed_gap_final_mean": float(np.mean(np.abs(again - first))),
    }
    by_margin = metrics.decisions_by_margin(mean_f[:, -1], real_f[:, -1], seed_var_F)
  families = verdicts.score_families(sim, runs, found, pred,
                                     {r: n for n, r in enumerate(reps)})
  return ValidationReport(tuple(r.header.run_id for r in held), tuple(rerun_ids), methods,
                          ceiling, level,
                          _decisions_by_kind(held, mean_f[:, -1], real_f[:, -1]), by_margin,
                          families, validate_diagnostics(sim, held, progress=progress))


def validate_diagnostics(sim: Simulator, runs: Sequence[RunLog], *,
                         progress: bool = False) -> dict[str, dict[str, Any]]:
  """Whether the surrogate's diagnostics rank the real model's across orders.

  For the runs whose evals carry real diagnostics (RunLog eval `diagnostics`), simulates
  their distinct orders with diagnostics (every seed, averaged) and compares, per diagnostic
  and fragment, the surrogate's value at the runs' last such eval with the real one across
  the orders (`metrics.diagnostic_agreement`: Spearman, so no mapping of scales is needed).
  Seed re-runs of an order (`group_reruns`) are left out of that and give the ceiling: the
  same agreement between a run and its re-run across the re-run orders, when 3 or more are.

  Returns:
    diagnostic name -> `per_fragment`, `median`, `predicted`, `orders`, and
    `seed_to_seed` (median over fragments of the re-runs' Spearman; NaN with fewer than 3
    re-run pairs); empty when fewer than 3 distinct orders carry diagnostics.

  Raises:
    CalibrationError: the runs' last evals with diagnostics are at different steps.
  """
  have, pred, real = diagnostics_pred_real(sim, runs, min_orders=3, progress=progress)
  return diagnostics_agreement_of(have, pred, real) if pred else {}


def diagnostics_agreement_of(runs: Sequence[RunLog], pred: dict[str, np.ndarray],
                             real: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """`validate_diagnostics`'s figures from `diagnostics_pred_real`'s arrays of `runs`."""
  reps, pairs = group_reruns(runs)
  out = {}
  for name in DIAGNOSTIC_NAMES:
    seed = float("nan")
    if len(pairs) >= 3:
      seed = metrics.diagnostic_agreement(real[name][[b for _, b in pairs]],
                                          real[name][[a for a, _ in pairs]])["median"]
    out[name] = {**metrics.diagnostic_agreement(pred[name][reps], real[name][reps]),
                 "orders": len(reps), "seed_to_seed": seed}
  return out


def diagnostics_pred_real(sim: Simulator, runs: Sequence[RunLog], *, min_orders: int = 1,
                          progress: bool = False
                          ) -> tuple[list[RunLog], dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The surrogate's and the real model's final diagnostics of the runs that carry them.

  Simulates each distinct order once (every seed, averaged); re-runs share their order's.

  Returns:
    (the N runs with diagnostics, predicted name -> [N, F], real name -> [N, F]); the dicts
    are empty when fewer than `min_orders` distinct orders carry diagnostics (nothing is
    simulated then).

  Raises:
    CalibrationError: the runs' last evals with diagnostics are at different steps.
  """
  names = sim.fragments.names
  have = []
  for r in runs:
    steps, arrays = diagnostics_arrays(r, names)
    if steps:
      have.append((r, steps[-1], {k: v[-1] for k, v in arrays.items()}))
  step = have[0][1] if have else None
  for r, s, _ in have[1:]:
    if s != step:
      raise CalibrationError(f"{where(r)} has its last diagnostics at step {s}, "
                             f"{where(have[0][0])} at step {step}; they cannot be compared")
  used = [r for r, _, _ in have]
  slot: dict[tuple, int] = {}   # each distinct order's row in the simulation
  idx = [slot.setdefault(_order_key(r), len(slot)) for r in used]
  if len(slot) < max(min_orders, 1):
    return used, {}, {}
  reps = [idx.index(n) for n in range(len(slot))]
  orders = np.stack([order_from_runlog(used[i], sim.fragments) for i in reps])
  lrs = np.stack([run_learning_rates(used[i]) for i in reps])
  _, traj = predict(sim, orders, lrs, [step], diagnostics=True, progress=progress)
  pred, real = {}, {}
  for name in DIAGNOSTIC_NAMES:
    p = np.asarray(getattr(traj.diagnostics, name), float)             # (R S) C F
    with np.errstate(invalid="ignore"):
      pred[name] = np.nanmean(p.reshape(len(reps), -1, *p.shape[1:]), 1)[:, -1][idx]
    real[name] = np.stack([d[name] for _, _, d in have])
  return used, pred, real
