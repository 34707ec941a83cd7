"""Verdicts checked on real counterfactuals: own contributions, outcome labels, interference.

A *counterfactual family* is a real base run and real runs of the same order without one
fragment each (`surrogate.orders.without_fragment`), marked in their headers by
`counterfactual_of: {"base": "<run_id>", "without": "<fragment>"}` (DESIGN.md, optional
RunLog fields). On such a family the quantities behind the outcome labels are measured on
real training, so the simulator's are scored against them (DESIGN.md's conventions: a
relative change against the run without the fragment, positive when feeding helps):

- own contribution of fragment f: (loss_f(without f) - loss_f(base)) / loss_f(without f),
  on the final probe loss and on the final loss of f's evaluated train examples;
- interference of i on j: the same for fragment j in the run without i;
- outcome labels from these (`label_outcomes`, the one labeller: the answers layer's
  what-if and screen use it too).

Beside every figure stands the same figure between two real seeds of the family (a
re-run of the base and of the runs without a fragment: same batches, other seed), and for
the interference the *dilution-only* baseline: taking i out feeds proportionally more of
every other fragment j, which lowers j's loss by j's own contribution times the share of
extra examples of j — no transfer between fragments at all, with the real own
contributions. Most large real entries then share one sign, so beating this baseline, not
the sign, says whether transfer is predicted.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibrate.fitting import metrics
from calibrate.fitting.calibration import Prediction, Simulator
from calibrate.io.runlog import RunLog, order_from_runlog, where
from surrogate.errors import CalibrationError
from surrogate.fragments import Fragments
from surrogate.orders import order_sha256

MIN_FRAGMENTS = 3  # fewer runs without a fragment rank nothing


class Outcome(enum.Enum):
  """What happens to a fragment under an order (DESIGN.md)."""
  FORGOTTEN = "forgotten"
  GENERALIZES = "generalizes"
  MEMORIZED = "memorized"
  NOT_LEARNED = "not learned"


OUTCOMES = tuple(Outcome)
_INDEX = {o: i for i, o in enumerate(OUTCOMES)}


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Relative thresholds of the outcome labels (DESIGN.md's defaults)."""
  generalizes: float = 0.02
  memorized: float = 0.02
  forgotten: float = 0.02


def label_outcomes(final_probe: np.ndarray, min_probe: np.ndarray, own_probe: np.ndarray,
                   own_train: np.ndarray, thresholds: Thresholds) -> np.ndarray:
  """Each fragment's outcome as an index into `OUTCOMES`, by DESIGN.md's precedence.

  Args (arrays of one shape; NaN compares false):
    final_probe, min_probe: the fragment's final and lowest probe loss during the run.
    own_probe, own_train: its own contribution to the final probe and train loss (relative
      drop against the counterfactual).
  """
  forgotten = final_probe >= (1 + thresholds.forgotten) * min_probe
  return np.select([forgotten, own_probe >= thresholds.generalizes,
                    own_train >= thresholds.memorized],
                   [_INDEX[Outcome.FORGOTTEN], _INDEX[Outcome.GENERALIZES],
                    _INDEX[Outcome.MEMORIZED]], _INDEX[Outcome.NOT_LEARNED])


@dataclasses.dataclass(frozen=True)
class Family:
  """One counterfactual family among some runs.

  Attributes:
    base: index of the base run.
    without: fragment number -> index of the run without that fragment.
  """
  base: int
  without: dict[int, int]


@dataclasses.dataclass(frozen=True)
class Verdicts:
  """Own contributions, labels and interference of one family (real or predicted).

  Attributes:
    fragments: the fragment numbers left out, in order (rows of the interference).
    own_probe, own_train: [L] own contribution of each left-out fragment (relative).
    labels: [L] outcome label of each (an index into `OUTCOMES`).
    interference: [L, F] relative change of every fragment's final probe loss caused by
      feeding the left-out fragment (its own entry is own_probe).
  """
  fragments: tuple[int, ...]
  own_probe: np.ndarray
  own_train: np.ndarray
  labels: np.ndarray
  interference: np.ndarray


def families(runs: Sequence[RunLog], fragments: Fragments) -> list[Family]:
  """The counterfactual families among `runs`, from their `counterfactual_of` headers.

  Raises:
    CalibrationError: a header's `counterfactual_of` is malformed, names a base run not
      among `runs` or an unknown fragment, or its run is not the base order without that
      fragment (other slots changed, or the fragment still fed).
  """
  by_id = {r.header.run_id: i for i, r in enumerate(runs)}
  found: dict[int, dict[int, int]] = {}
  pools = fragments.train_pools()
  for i, r in enumerate(runs):
    cf = r.header.extra.get("counterfactual_of")
    if cf is None:
      continue
    field = f"{where(r)}, header field counterfactual_of"
    if not (isinstance(cf, dict) and isinstance(cf.get("base"), str)
            and isinstance(cf.get("without"), str)):
      raise CalibrationError(f"{field}: expected {{\"base\": \"<run_id>\", \"without\": "
                             f"\"<fragment>\"}}, got {cf!r}")
    if cf["base"] not in by_id:
      raise CalibrationError(f"{field}: its base run {cf['base']!r} is not among the runs "
                             "given; pass the base run too")
    if cf["without"] not in fragments.names:
      raise CalibrationError(f"{field}: {cf['without']!r} is not a fragment of the "
                             "fragments file")
    b, f = by_id[cf["base"]], fragments.names.index(cf["without"])
    base_TxB = order_from_runlog(runs[b], fragments)
    order_TxB = order_from_runlog(r, fragments)
    own = np.isin(base_TxB, pools[f])
    if (order_TxB.shape != base_TxB.shape or (order_TxB[~own] != base_TxB[~own]).any()
        or np.isin(order_TxB, pools[f]).any()):
      raise CalibrationError(f"{field}: the run is not {cf['base']!r}'s order without "
                             f"{cf['without']!r} (orders.without_fragment changes only that "
                             "fragment's slots and feeds none of it)")
    if f in found.setdefault(b, {}):
      raise CalibrationError(f"{field}: {where(runs[found[b][f]])} is already the run of "
                             f"{cf['base']!r} without {cf['without']!r}")
    found[b][f] = i
  return [Family(b, dict(sorted(w.items()))) for b, w in sorted(found.items())]


def _relative(without, base):
  with np.errstate(invalid="ignore", divide="ignore"):
    return (without - base) / without


def verdicts_of(probe_RxCxF: np.ndarray, train_RxF: np.ndarray, left_out: Sequence[int],
                thresholds: Thresholds = Thresholds()) -> Verdicts:
  """The verdicts of one family from its fragment losses.

  Args:
    probe_RxCxF: mean probe loss per fragment at every eval step of the base run (row 0)
      and of the runs without `left_out[r - 1]` (row r).
    train_RxF: final mean loss of each fragment's evaluated train examples, same rows.
    left_out: the fragment left out of each row after the first.
  """
  f = np.asarray(left_out)
  rows = np.arange(1, len(f) + 1)
  final = probe_RxCxF[:, -1]
  own_p = _relative(final[rows, f], final[0, f])
  own_t = _relative(train_RxF[rows, f], train_RxF[0, f])
  with np.errstate(invalid="ignore"):
    labels = label_outcomes(final[0, f], np.nanmin(probe_RxCxF[0, :, f], axis=-1), own_p,
                            own_t, thresholds)
  return Verdicts(tuple(int(x) for x in f), own_p, own_t, labels,
                  _relative(final[rows], final[0][None]))


def dilution_interference(base_TxB: np.ndarray, without_LxTxB: np.ndarray,
                          fragment_of: np.ndarray, own_probe_F: np.ndarray) -> np.ndarray:
  """[L, F] the dilution-only prediction of each row of the interference: j's own
  contribution times the extra examples of j fed without the left-out fragment, relative
  to j's count in the base order (a loss falls by more the more of it is fed)."""
  num_f = len(own_probe_F)

  def counts(order):
    fed = order[order >= 0]
    return np.bincount(fragment_of[fed], minlength=num_f).astype(np.float64)

  base_F = counts(base_TxB)
  extra_LxF = np.stack([counts(o) for o in without_LxTxB]) - base_F
  with np.errstate(invalid="ignore", divide="ignore"):
    return -extra_LxF / base_F * own_probe_F[None]


def off_diagonal(matrix_LxF: np.ndarray, left_out: Sequence[int]) -> np.ndarray:
  mask = np.ones(matrix_LxF.shape, bool)
  mask[np.arange(len(left_out)), np.asarray(left_out)] = False
  return matrix_LxF[mask]


def agreement(pred: Verdicts, real: Verdicts) -> dict[str, float]:
  """How well `pred` (a prediction, or another real seed) matches `real`, on the fragments
  both left out."""
  common = [f for f in real.fragments if f in pred.fragments]
  pi = [pred.fragments.index(f) for f in common]
  ri = [real.fragments.index(f) for f in common]
  p_own, r_own = pred.own_probe[pi], real.own_probe[ri]
  gen = real.labels[ri] == _INDEX[Outcome.GENERALIZES]
  p_off = off_diagonal(pred.interference[pi], common)
  r_off = off_diagonal(real.interference[ri], common)
  return {
      "fragments": float(len(common)),
      "own_probe_spearman": metrics.spearman(p_own, r_own),
      "own_train_spearman": metrics.spearman(pred.own_train[pi], real.own_train[ri]),
      "own_probe_sign_agreement": float(np.mean(np.sign(p_own) == np.sign(r_own))),
      "own_probe_mean_abs_error": float(np.nanmean(np.abs(p_own - r_own))),
      "label_accuracy": float(np.mean(pred.labels[pi] == real.labels[ri])),
      "generalizes_auroc": (metrics.auroc(p_own, gen) if 0 < gen.sum() < len(gen)
                            else float("nan")),
      "interference_spearman": metrics.spearman(p_off, r_off),
      "interference_sign_agreement": float(np.mean(np.sign(p_off) == np.sign(r_off))),
  }


def _fragment_losses(losses_RxCxM, frag_M, probe_M, num_f):
  probe = metrics.fragment_means(losses_RxCxM, frag_M, probe_M, num_f)
  train = metrics.fragment_means(losses_RxCxM[:, -1:], frag_M, ~probe_M, num_f)[:, 0]
  return probe, train


def real_losses(runs: Sequence[RunLog], steps: np.ndarray, ids: Sequence[str]) -> np.ndarray:
  """[R, C, M] the runs' logged losses of `ids` at `steps`."""
  out = []
  for r in runs:
    by_step = {ev.step: ev.losses for ev in r.evals}
    try:
      out.append([[by_step[int(s)][i] for i in ids] for s in steps])
    except KeyError as e:
      raise CalibrationError(f"{where(r)} lacks the loss of {e.args[0]!r} at an eval "
                             "step; validation needs every probe at every eval") from None
  return np.array(out, np.float64)


def _seed_twin(fam: Family, runs: Sequence[RunLog], fragments: Fragments,
               all_families: Sequence[Family]) -> Family | None:
  """The family re-run with another seed: same base batches, same fragments left out."""
  def sha(i):
    return order_sha256(order_from_runlog(runs[i], fragments))

  for other in all_families:
    common = set(other.without) & set(fam.without)
    if (other is not fam and runs[other.base].header.seed != runs[fam.base].header.seed
        and sha(other.base) == sha(fam.base) and len(common) >= MIN_FRAGMENTS
        and all(sha(other.without[f]) == sha(fam.without[f]) for f in common)):
      return other
  return None


def _logged_by_all(ids: Sequence[str], probe_M: np.ndarray, runs: Sequence[RunLog]) -> np.ndarray:
  """Which evaluated examples count: every probe, and the train examples every run logged."""
  return np.array([probe_M[m] or all(i in ev.losses for r in runs for ev in r.evals)
                   for m, i in enumerate(ids)])


def score_families(sim: Simulator, runs: Sequence[RunLog], found: Sequence[Family],
                   pred: Prediction, row_of: Mapping[int, int], *,
                   thresholds: Thresholds = Thresholds()) -> list[dict[str, Any]]:
  """The verdict figures of every family in `found` (`families(runs, ...)`) whose runs were
  predicted (`row_of`: run index -> row of `pred`), each beside the same figures between
  two real seeds where the family was re-run, and the dilution-only baseline.

  A family's re-run with another seed is scored only as the ceiling of the first.
  """
  frags = sim.fragments
  num_f = len(frags.names)
  steps, ids = pred.steps, pred.eval_ids
  frag_M, probe_M = pred.frag_M, pred.is_probe_M
  out, twins = [], set()
  for fam in found:
    if fam.base in twins:
      continue
    idx = [fam.base, *fam.without.values()]
    left = list(fam.without)
    if len(left) < MIN_FRAGMENTS or any(i not in row_of for i in idx):
      continue
    # Train examples count where every run of the family logged them (probes must be there).
    keep = _logged_by_all(ids, probe_M, [runs[i] for i in idx])
    kept = [x for x, k in zip(ids, keep) if k]
    real = verdicts_of(*_fragment_losses(real_losses([runs[i] for i in idx], steps, kept),
                                         frag_M[keep], probe_M[keep], num_f), left, thresholds)
    # Each member's verdicts, then their mean: the ensemble's own contributions.
    members = pred.members_NxKxCxM[[row_of[i] for i in idx]][..., keep]   # R K C M
    per_member = [verdicts_of(*_fragment_losses(members[:, k], frag_M[keep], probe_M[keep],
                                                num_f), left, thresholds)
                  for k in range(members.shape[1])]
    with np.errstate(invalid="ignore"):
      share = np.stack([np.mean([v.labels == o for v in per_member], 0)
                        for o in range(len(OUTCOMES))], -1)
      predicted = Verdicts(real.fragments,
                           np.nanmean([v.own_probe for v in per_member], 0),
                           np.nanmean([v.own_train for v in per_member], 0),
                           np.argmax(share, -1),
                           np.nanmean([v.interference for v in per_member], 0))
    orders = [order_from_runlog(runs[i], frags) for i in idx]
    own_all = np.full(num_f, np.nan)
    own_all[left] = real.own_probe
    dilution = dilution_interference(orders[0], np.stack(orders[1:]), frags.fragment_of,
                                     own_all)
    figures = agreement(predicted, real)
    figures["dilution_interference_spearman"] = metrics.spearman(
        off_diagonal(dilution, left), off_diagonal(real.interference, left))
    twin = _seed_twin(fam, runs, frags, found)
    seed: dict[str, float] = {}
    if twin is not None:
      twins.add(twin.base)
      t_idx = [twin.base, *twin.without.values()]
      t_keep = keep & _logged_by_all(ids, probe_M, [runs[i] for i in t_idx])
      again = verdicts_of(*_fragment_losses(
          real_losses([runs[i] for i in t_idx], steps, [x for x, k in zip(ids, t_keep) if k]),
          frag_M[t_keep], probe_M[t_keep], num_f), list(twin.without), thresholds)
      seed = agreement(again, real)
    names = frags.names
    out.append({
        "base": runs[fam.base].header.run_id,
        "seed_rerun": None if twin is None else runs[twin.base].header.run_id,
        "fragments": [names[f] for f in left],
        "simulator": figures, "seed_to_seed": seed,
        "real": _as_dict(real, names), "predicted": _as_dict(predicted, names),
    })
  return out


def _as_dict(v: Verdicts, names: Sequence[str]) -> dict[str, Any]:
  return {"own_probe": v.own_probe.tolist(), "own_train": v.own_train.tolist(),
          "labels": [OUTCOMES[int(x)].value for x in v.labels],
          "interference": {names[f]: row.tolist() for f, row in zip(v.fragments,
                                                                   v.interference)}}


def format_family(fam: dict[str, Any]) -> str:
  """A few lines for people: each figure beside the seed-to-seed one."""
  sim, seed = fam["simulator"], fam["seed_to_seed"]
  lines = [f"counterfactual family of {fam['base']} ({len(fam['fragments'])} fragments left "
           "out; simulator, and beside it two real seeds"
           + (f", {fam['seed_rerun']}" if fam["seed_rerun"] else ": no seed re-run") + ")"]
  for k in ("own_probe_spearman", "own_train_spearman", "own_probe_sign_agreement",
            "own_probe_mean_abs_error", "label_accuracy", "generalizes_auroc",
            "interference_spearman", "interference_sign_agreement"):
    lines.append(f"  {k:<32}{_fmt(sim[k]):>9}{_fmt(seed.get(k, np.nan)):>9}")
  lines.append(f"  {'dilution_interference_spearman':<32}"
               f"{_fmt(sim['dilution_interference_spearman']):>9}")
  return "\n".join(lines)


def _fmt(v: float) -> str:
  return "-" if v is None or not np.isfinite(v) else f"{v:.4f}"
