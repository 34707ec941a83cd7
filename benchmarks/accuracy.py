"""Accuracy of the calibrated simulator on the committed real run sets (issue 4's figures).

For each set: calibrate on the four shuffled runs (the plan's calibration runs), then
validate on every other run (16 structured orders, plus 4 seed re-runs for the noise
ceiling). `--plan mixed` calibrates instead on two shuffles and two structured runs
(`blocked-p1`, `subset-1`: structured orders show order effects, so they tell the gain) and
validates on the 18 others. Prints the fit summary, the validation table (simulator beside
the baselines) and the wall time of each part; `--json PATH` also writes every figure.

  python benchmarks/accuracy.py                # lm (test) and cls, about 10 minutes here
  python benchmarks/accuracy.py --task lm-dev --lr-scales 2   # the LM development set
  python benchmarks/accuracy.py --task lm --plan mixed
  python benchmarks/accuracy.py --task lm --plan mixed --length 32 --lr-scales 2
  python benchmarks/accuracy.py --task lm-dev --effect-errors 0.25,0.5,1,2   # interval sweep
  python benchmarks/accuracy.py --task lm-dev --real-tokenizer   # the real model's tokens
  python benchmarks/accuracy.py --task dev --teacher   # distilled from the real base (LM sets)

Where the set has a counterfactual family (`counterfactual/`: a base shuffle and the same
order without each fragment, two seeds; `python -m calibrate.reference.lm --counterfactual`),
the same simulator is validated on it too: the verdict figures (own contributions, outcome
labels, interference) beside two real seeds and the dilution-only baseline.

`--effect-errors` validates the same fit again with each value of the intervals' effect
error in place of the one fit chose (how `FitConfig.fallback_effect_error` was set, on the
development sets): only the intervals change, so the surrogate is simulated once.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import numpy as np

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

from calibrate.fitting import calibration
from calibrate.fitting.calibration import Simulator
from calibrate.fitting.fit import FitConfig, fit
from calibrate.fitting.validate import validate
from calibrate.io.runlog import read_runlog
from calibrate.reference import DEVELOPMENT_SETS, SETS
from calibrate.reference import real_tokenizer as reference_tokenizer
from surrogate.fragments import read_fragments
from surrogate.model import ModelConfig
from surrogate.prepare import model_config_for

DATA = os.path.join(os.path.dirname(__file__), "..", "calibrate", "reference", "data")


CALIBRATION = {"shuffles": ("shuffled-s0", "shuffled-s1", "shuffled-s2", "shuffled-s3"),
               "mixed": ("shuffled-s0", "shuffled-s1", "blocked-p1", "subset-1")}


def _key(seed: int):
  import jax  # after XLA_FLAGS is set above
  return jax.random.key(seed)


def coverage_sweep(sim: Simulator, held: list, values: list[float]) -> dict[float, float]:
  """Interval coverage on `held` with each effect error in place of `sim`'s."""
  simulate_many, cache = calibration.simulate_many, {}

  def once(params, knobs, orders, lrs, data, **kw):
    key = (np.asarray(orders).tobytes(), np.asarray(lrs).tobytes())
    if key not in cache:
      cache[key] = simulate_many(params, knobs, orders, lrs, data, **kw)
    return cache[key]

  calibration.simulate_many = once  # the simulations do not depend on the effect error
  try:
    return {e: validate(dataclasses.replace(sim, calibration=sim.calibration._replace(
        effect_error=np.float64(e))), held).methods["simulator"]["coverage"] for e in values}
  finally:
    calibration.simulate_many = simulate_many


def _with_rank(run, rank: int):
  """The run with its LoRA adapter's rank set to `rank` and alpha scaled to keep alpha / r
  (peft's update scale): the rank-rescaling experiment of issue 20."""
  adapter = dict(run.header.extra.get("adapter") or {})
  if not adapter:
    raise SystemExit(f"--lora-rank: run {run.header.run_id} trained no adapter")
  adapter["alpha"] = float(adapter.get("alpha", adapter["r"])) * rank / int(adapter["r"])
  adapter["r"] = rank
  header = dataclasses.replace(run.header, extra={**run.header.extra, "adapter": adapter})
  return dataclasses.replace(run, header=header)


def run(task: str, seeds: int, plan: str, length: int | None = None,
        lr_scales: tuple[float, ...] | None = FitConfig.lr_scales,
        gain_prior: float | None = None, gain_prior_sd: float | None = None,
        effect_errors: tuple[float, ...] = (), real_tokenizer: bool = False,
        teacher: bool = False, distill_steps: int = FitConfig.distill_steps,
        full_mode: bool = False, lora_rank: int | None = None) -> dict:
  folder = os.path.join(DATA, task)
  frags = read_fragments(os.path.join(folder, "fragments.jsonl"))
  runs = [read_runlog(p, frags) for p in sorted(glob.glob(os.path.join(folder, "runs", "*.jsonl")))]
  if lora_rank is not None:
    runs = [_with_rank(r, lora_rank) for r in runs]
  cal = [r for r in runs if r.header.run_id in CALIBRATION[plan]]
  held = [r for r in runs if r.header.run_id not in CALIBRATION[plan]
          and not r.header.run_id.startswith("shuffled-")]
  t0 = time.perf_counter()
  cfg, tokenizer = None if length is None else ModelConfig(length=length), None
  the_teacher = _make_teacher(task, frags) if teacher else None
  if real_tokenizer or teacher:
    cfg, tokenizer = model_config_for(frags, length=length,
                                      real_tokenizer=reference_tokenizer(task))
  sim = fit(frags, cal, model_cfg=cfg, tokenizer=tokenizer, teacher=the_teacher,
            config=FitConfig(seeds=seeds, lr_scales=lr_scales, distill_steps=distill_steps,
                             low_rank=not full_mode,
                             **({} if gain_prior is None else
                                {"gain_prior": gain_prior, "teacher_gain_prior": gain_prior}),
                             **({} if gain_prior_sd is None else
                                {"gain_prior_sd": gain_prior_sd,
                                 "teacher_gain_prior_sd": gain_prior_sd})),
            key=_key(0), progress=False)
  t_fit = time.perf_counter() - t0
  t0 = time.perf_counter()
  report = validate(sim, held)
  t_val = time.perf_counter() - t0
  print(f"\n== {task}, plan {plan}: calibrated on {len(cal)} runs in {t_fit:.0f} s "
        f"(pre-training {sim.fit_info.seconds.pretrain:.0f} s), validated on {len(held)} "
        f"runs in {t_val:.0f} s; surrogate {sim.model_cfg.length} tokens per example, "
        + ("the real tokenizer" if real_tokenizer or teacher else "its own BPE")
        + (f", distilled {info_d.steps} steps (KL {info_d.kl_before:.3f} -> "
           f"{info_d.kl_after:.3f})" if (info_d := sim.fit_info.distillation) else "")
        + f", vocabulary {sim.model_cfg.vocab_size}"
        + (f", low-rank adapters {sim.opt_cfg.adapter.to_dict()}" if sim.opt_cfg.adapter
           else ""))
  info = sim.fit_info
  print(f"lr scale {info.lr_scale:g}; shape misfit "
        + ", ".join(f"x{c.lr_scale:g} {c.shape_misfit:.4f}" for c in info.knob_candidates))
  g, loo = info.gain, info.leave_one_run_out
  print(f"common gain {g.common_gain:.2f} +- {g.common_gain_sd:.2f} (data weight "
        f"{g.data_weight:.2f}); fit MSE {info.fit_mse:.5f}; leave-one-run-out MSE "
        f"{loo.mse:.5f} vs order-agnostic {loo.order_agnostic_mse:.5f}; Simfluence ridge "
        f"{info.baselines.simfluence_ridge:g}")
  e = info.effect_error
  loo_e = "none" if e.leave_one_run_out is None else f"{e.leave_one_run_out:.3f}"
  rho = info.train_fidelity
  print(f"effect error {e.used:.3f} (prior {e.prior:.3g}, leave-one-run-out {loo_e}; "
        f"train fidelity {'none' if rho is None else f'{rho:.3f}'})")
  print(report.format_table())
  family = _counterfactual_report(sim, folder, frags)
  sweep = coverage_sweep(sim, held, list(effect_errors)) if effect_errors else {}
  for e, c in sweep.items():
    print(f"coverage with effect error {e:g}: {c:.3f}")
  sys.stdout.flush()
  return {"fit_seconds": t_fit, "validate_seconds": t_val, "fit": info.to_json(),
          "validation": report.to_dict(), "coverage_by_effect_error": sweep,
          "counterfactual": None if family is None else family.to_dict()}


def _make_teacher(task: str, frags):
  """The set's real base model's next-token distributions (`surrogate teach`), in memory."""
  from calibrate.reference import teacher_of
  t0 = time.perf_counter()
  try:
    out = teacher_of(task, frags)
  except ValueError as e:
    raise SystemExit(f"--teacher: {e}") from None
  print(f"teacher of {task}: {len(out.source_N)} texts in {time.perf_counter() - t0:.0f} s")
  return out


def _counterfactual_report(sim: Simulator, folder: str, frags):
  paths = sorted(glob.glob(os.path.join(folder, "counterfactual", "*.jsonl")))
  if not paths:
    return None
  t0 = time.perf_counter()
  report = validate(sim, [read_runlog(p, frags) for p in paths])
  print(f"\n-- the counterfactual family ({len(paths)} runs, {time.perf_counter() - t0:.0f} s): "
        "every metric of the table on its orders, then the verdicts")
  print(report.format_table())
  sys.stdout.flush()
  return report


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=[*SETS, "both", "dev"], default="both",
                 help="both: lm (the test set) and cls; dev: every development set "
                      f"({', '.join(DEVELOPMENT_SETS)}); or one set")
  p.add_argument("--seeds", type=int, default=FitConfig.seeds)
  p.add_argument("--plan", choices=sorted(CALIBRATION), default="shuffles",
                 help="which runs calibrate (see above)")
  p.add_argument("--length", type=int, default=None,
                 help="surrogate tokens per example (default: fit's, from the data)")
  p.add_argument("--lr-scales", default="",
                 help="candidate learning-rate scales for fit (one: no choice; default: "
                      "fit's, by the context length)")
  p.add_argument("--gain-prior", type=float, default=None,
                 help="prior mean of the common gain, with or without --teacher (default: "
                      "calibrate.fitting.fit.FitConfig's)")
  p.add_argument("--gain-prior-sd", type=float, default=None,
                 help="sd of that prior, with or without --teacher (default: FitConfig's)")
  p.add_argument("--effect-errors", default="",
                 help="comma-separated effect errors: coverage of the same fit with each")
  p.add_argument("--real-tokenizer", action="store_true",
                 help="the surrogate reads the real model's tokens (the sets' own tokenizer, "
                      "compacted) instead of a BPE of the fragments")
  p.add_argument("--teacher", action="store_true",
                 help="distil the surrogate from the set's real base model (its real "
                      "tokenizer too; LM sets only)")
  p.add_argument("--distill-steps", type=int, default=FitConfig.distill_steps)
  p.add_argument("--full-mode", action="store_true",
                 help="a full fine-tune in the surrogate even when the runs trained LoRA "
                      "adapters (the comparison for lm-lora)")
  p.add_argument("--lora-rank", type=int, default=None,
                 help="the surrogate's adapter rank in place of the header's (alpha scaled "
                      "to keep alpha / r): the rank-rescaling comparison for lm-lora")
  p.add_argument("--json", help="write every figure to this file")
  args = p.parse_args()
  tasks = {"both": ["lm", "cls"], "dev": list(DEVELOPMENT_SETS)}.get(args.task, [args.task])
  scales = tuple(float(x) for x in args.lr_scales.split(",") if x) or None
  sweep = tuple(float(x) for x in args.effect_errors.split(",") if x)
  out = {t: run(t, args.seeds, args.plan, args.length, scales, args.gain_prior,
                args.gain_prior_sd, sweep, args.real_tokenizer, args.teacher, args.distill_steps,
                args.full_mode, args.lora_rank)
         for t in tasks}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
