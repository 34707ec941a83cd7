"""The accuracy metrics of DESIGN.md, on per-fragment probe-loss trajectories.

Every function takes plain arrays: R runs (one per order), C checkpoints, F fragments. They
are pure and small so that `validate` and the baselines share one definition of each figure.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import stats

__all__ = [
    "auroc",
    "better_than_median_auroc",
    "counterfactual_rank",
    "coverage",
    "decision_accuracy",
    "decisions_by_margin",
    "diagnostic_agreement",
    "expected_seed_agreement",
    "fragment_means",
    "order_decision_accuracy",
    "trajectory_fidelity",
]


def fragment_means(losses_RxCxM: np.ndarray, frag_M: np.ndarray, select_M: np.ndarray,
                   num_fragments: int) -> np.ndarray:
  """Mean loss over each fragment's selected examples: [..., M] -> [..., F] (NaN if none)."""
  onehot_FxM = (frag_M[None, :] == np.arange(num_fragments)[:, None]) & select_M[None, :]
  count_F = onehot_FxM.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (losses_RxCxM @ onehot_FxM.T.astype(losses_RxCxM.dtype)) / count_F


def trajectory_fidelity(pred_RxCxF: np.ndarray, real_RxCxF: np.ndarray) -> dict[str, float]:
  """Simfluence's protocol on fragment probe-loss trajectories.

  Returns:
    `mse`: mean squared error over all (run, checkpoint, fragment); `spearman`: per fragment,
    the rank correlation over all its (run, checkpoint) points, averaged over fragments.
  """
  err = np.mean((pred_RxCxF - real_RxCxF) ** 2)
  rhos = [spearman(pred_RxCxF[..., f].ravel(), real_RxCxF[..., f].ravel())
          for f in range(real_RxCxF.shape[-1])]
  return {"mse": float(err), "spearman": _nanmean(rhos)}


def counterfactual_rank(pred_RxF: np.ndarray, real_RxF: np.ndarray) -> dict[str, float]:
  """Rank agreement of final probe losses across orders.

  Returns:
    `spearman`: per fragment, the rank correlation over orders, averaged over fragments;
    `kendall_tau`: Kendall's tau of the orders ranked by mean (over fragments) probe loss.
  """
  rhos = [spearman(pred_RxF[:, f], real_RxF[:, f]) for f in range(real_RxF.shape[1])]
  tau = stats.kendalltau(pred_RxF.mean(1), real_RxF.mean(1)).statistic
  return {"spearman": _nanmean(rhos), "kendall_tau": float(tau)}


def decision_accuracy(pred_RxF: np.ndarray, real_RxF: np.ndarray,
                      pairs: list[tuple[int, int]] | None = None) -> float:
  """Share of (pair of orders, fragment) decisions where the predicted better order is the
  real better one (DataDecide's measure). A predicted tie counts one half.

  Args:
    pred_RxF, real_RxF: final probe loss per order and fragment (lower is better).
    pairs: the order pairs to judge (default: all pairs).
  """
  return _decisions(pred_RxF, real_RxF, pairs)


def expected_seed_agreement(real_RxF: np.ndarray, seed_var_F: np.ndarray,
                            pairs: list[tuple[int, int]] | None = None) -> float:
  """Estimated noise ceiling of `decision_accuracy` over pairs that were run once.

  The ceiling measured from re-runs covers only the re-run orders' pairs, which may differ
  more than most. Here each (pair, fragment) difference d is one real difference delta plus
  seed noise of variance s2 = 2 x a run's seed variance; two independent re-runs of the
  pair agree on its sign with probability p^2 + (1 - p)^2, p = Phi(delta / sqrt(s2)). That
  chance is averaged over delta's posterior given d, under a normal prior per fragment
  whose variance is the fragment's mean d^2 less s2 (empirical Bayes; on simulated sets
  within 0.02 of the exact ceiling, where plugging in d itself, or d with the noise
  subtracted, is biased by 0.03-0.05).

  Args:
    real_RxF: final real probe loss per order and fragment.
    seed_var_F: each fragment's seed-to-seed variance of one run's final probe loss (from
      re-runs: half the mean squared difference of a run and its re-run).
    pairs: the order pairs (default: all pairs).
  """
  cells = _seed_posterior(real_RxF, seed_var_F, pairs)
  if cells is None:
    return float("nan")
  d, p, w = cells
  agree = ((p * p + (1 - p) ** 2) * w).sum(-1)
  return float(agree[np.isfinite(d)].mean())


def decisions_by_margin(pred_RxF: np.ndarray, real_RxF: np.ndarray, seed_var_F: np.ndarray,
                        edges: tuple[float, ...] = (1.0, 2.0, 4.0)) -> list[dict[str, float]]:
  """`decision_accuracy` over all pairs, split by how clearly the real runs decide.

  Each (pair of orders, fragment) decision falls in a band by its margin: the real
  difference |d| in units of the seed noise of a difference, sqrt(2 x seed_var). Per band:
  the decisions, the share `pred_RxF` gets right, and the noise ceiling there: the chance
  that a re-run of the pair decides as the observed runs did, P(sign d' = sign d | d),
  under `expected_seed_agreement`'s posterior. Small margins are near coin flips even for
  re-runs; large ones should be right.

  Args:
    pred_RxF, real_RxF: final probe loss per order and fragment (lower is better).
    seed_var_F: as in `expected_seed_agreement`.
    edges: the band edges in noise units; bands [0, e1), [e1, e2), ..., [e_last, inf).

  Returns:
    One dict per band: `lo`, `hi` (noise units), `decisions`, `accuracy`, `ceiling`
    (accuracy and ceiling NaN for an empty band).
  """
  pairs = list(itertools.combinations(range(real_RxF.shape[0]), 2))
  cells = _seed_posterior(real_RxF, seed_var_F, pairs)
  if cells is None:
    return []
  d, p, w = cells
  agree = (np.where(d[..., None] > 0, p, 1 - p) * w).sum(-1)
  hit, keep = _decision_cells(pred_RxF, real_RxF, pairs)
  margin = np.abs(d) / np.sqrt(np.maximum(2 * np.asarray(seed_var_F, float), 1e-300))[None]
  bounds = (0.0, *edges, np.inf)
  out = []
  for lo, hi in itertools.pairwise(bounds):
    sel = keep & (margin >= lo) & (margin < hi)
    n = int(sel.sum())
    out.append({"lo": lo, "hi": hi, "decisions": n,
                "accuracy": float(hit[sel].mean()) if n else float("nan"),
                "ceiling": float(agree[sel].mean()) if n else float("nan")})
  return out


def _seed_posterior(real_RxF, seed_var_F, pairs):
  """(d [P, F], p [P, F, N], w [N]): each real difference, and Phi(delta / sqrt(s2)) at the
  N Gauss-Hermite nodes of delta's posterior with their weights (see
  `expected_seed_agreement`); None without pairs."""
  if pairs is None:
    pairs = list(itertools.combinations(range(real_RxF.shape[0]), 2))
  if not pairs:
    return None
  a, b = np.array(pairs).T
  d = real_RxF[a] - real_RxF[b]
  s2 = np.maximum(2 * np.asarray(seed_var_F, float), 1e-300)[None]
  prior = np.maximum(np.nanmean(d * d, 0, keepdims=True) - s2, 1e-300)
  shrink = prior / (prior + s2)
  x, w = np.polynomial.hermite_e.hermegauss(64)
  delta = (shrink * d)[..., None] + np.sqrt(shrink * s2)[..., None] * x
  return d, stats.norm.cdf(delta / np.sqrt(s2)[..., None]), w / w.sum()


def order_decision_accuracy(pred_RxF: np.ndarray, real_RxF: np.ndarray,
                            pairs: list[tuple[int, int]] | None = None) -> float:
  """`decision_accuracy` of orders judged by their mean probe loss over fragments."""
  return _decisions(pred_RxF.mean(1, keepdims=True), real_RxF.mean(1, keepdims=True), pairs)


def better_than_median_auroc(pred_drop_RxF: np.ndarray, real_drop_RxF: np.ndarray) -> float:
  """AUROC of "this order is better than the median order for this fragment" (metric 4).

  The label is whether the real relative probe drop exceeds the fragment's median over the
  orders; the score is the predicted drop minus the fragment's median predicted drop, so that
  scores are comparable across fragments. Pooled over all (order, fragment).
  """
  label = real_drop_RxF > np.median(real_drop_RxF, axis=0, keepdims=True)
  score = pred_drop_RxF - np.median(pred_drop_RxF, axis=0, keepdims=True)
  return auroc(score.ravel(), label.ravel())


def auroc(score: np.ndarray, label: np.ndarray) -> float:
  """Area under the ROC curve (the Mann-Whitney statistic; ties count one half)."""
  label = np.asarray(label, bool)
  pos, neg = int(label.sum()), int((~label).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  ranks = stats.rankdata(score)
  return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def coverage(lo: np.ndarray, hi: np.ndarray, real: np.ndarray) -> float:
  """Share of real values inside their predicted interval [lo, hi]."""
  return float(np.mean((real >= lo) & (real <= hi)))


def _decisions(pred_RxF, real_RxF, pairs) -> float:
  if pairs is None:
    pairs = list(itertools.combinations(range(real_RxF.shape[0]), 2))
  if not pairs:
    return float("nan")
  hit, keep = _decision_cells(pred_RxF, real_RxF, pairs)
  return float(hit[keep].mean()) if np.any(keep) else float("nan")


def _decision_cells(pred_RxF, real_RxF, pairs):
  """(hit, keep), both [pairs, F]: 1 / 0.5 / 0 for a right / tied / wrong prediction, and
  whether the decision counts."""
  a, b = np.array(pairs).T
  pred_d = np.sign(pred_RxF[a] - pred_RxF[b])
  real_d = np.sign(real_RxF[a] - real_RxF[b])
  hit = np.where(pred_d == 0, 0.5, (pred_d == real_d).astype(float))
  # Undecided real pairs and non-finite predictions (a diverged run) are left out.
  keep = (real_d != 0) & np.isfinite(pred_d) & np.isfinite(real_d)
  return hit, keep


def _nanmean(values) -> float:
  values = np.asarray(values, float)
  return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def spearman(x, y) -> float:
  """Spearman's rank correlation over the pairs where both are finite (NaN when either
  side is constant or fewer than two pairs remain)."""
  x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(stats.spearmanr(x, y).statistic)


# Fixed before any real diagnostics were recorded: a diagnostic is presented as a prediction
# of the real model only when, across held-out orders, the surrogate ranks it per fragment
# at least this well (median over fragments of Spearman's rho).
DIAGNOSTIC_AGREEMENT_BAR = 0.5


def diagnostic_agreement(pred_RxF: np.ndarray, real_RxF: np.ndarray,
                         bar: float = DIAGNOSTIC_AGREEMENT_BAR) -> dict[str, object]:
  """How well predicted values of one diagnostic rank the real ones across orders.

  Returns `per_fragment` (Spearman across the R orders of each fragment; NaN where either
  side is constant or missing), `median` over the fragments that have one, and `predicted`
  (median >= bar). Scale-free: the surrogate's diagnostics need no mapping to the real scale.
  """
  pred, real = np.asarray(pred_RxF, float), np.asarray(real_RxF, float)
  rho = np.array([spearman(pred[:, f], real[:, f]) for f in range(real.shape[1])])
  ok = np.isfinite(rho)
  median = float(np.median(rho[ok])) if ok.any() else float("nan")
  return {"per_fragment": rho.tolist(), "median": median,
          "predicted": bool(np.isfinite(median) and median >= bar)}
