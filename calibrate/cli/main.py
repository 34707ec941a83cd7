"""The `surrogate` command line: orders, fit, tier, validate, simulate, what-if, screen,
search, next-run, report, demo.

  surrogate orders --data F --kind blocked --sequence a,b,c --steps 200 --batch-size 16 --out o.jsonl
  surrogate fit --data F --runs r1.jsonl r2.jsonl r3.jsonl --out sim/ [--teacher teacher/]
  surrogate tier --sim sim/ --runs r1.jsonl r2.jsonl r3.jsonl   (fit and check the analytic tier)
  surrogate validate --sim sim/ --runs h1.jsonl h2.jsonl ... [--json]
  surrogate simulate --sim sim/ --orders o1.jsonl h1.jsonl --out DIR   (predicted, real scale)
  surrogate simulate --data F --orders o1.jsonl o2.jsonl --out DIR    (raw surrogate)
  surrogate what-if --sim sim/ --orders o1.jsonl o2.jsonl [--json]
  surrogate screen --sim sim/ [--orders 256] [--json]
  surrogate search --sim sim/ [--budget 32] [--out best.jsonl] [--json]
  surrogate next-run --sim sim/ [--out next.jsonl] [--json]
  surrogate report --sim sim/ --out report/
  surrogate teach --model DIR --data F --out teacher/   (the real base's distributions; torch)
  surrogate demo

what-if, screen, search, next-run and report take `--tier auto|analytic|transformer`: auto
(default) answers with the analytic tier where it passed its trust check, else with the
transformer surrogate, and says which answered and why (in `--json`: "tier", "tier_reason").

Run `surrogate COMMAND --help` for every option. Exit status: 0 done, 2 bad input (a usage
error, or an input file that is missing, unreadable or invalid: one line on stderr names it).
`--json` prints strict JSON, a missing value (NaN) as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
  """A command line that cannot be carried out as given (exit status 2)."""


class _Parser(argparse.ArgumentParser):
  """argparse, with its usage errors on one line (the usage itself is in --help)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_json(obj: Any) -> None:
  """`--json` output: strict JSON, every missing value (NaN, inf) as null."""
  import json

  from surrogate.jsonl import json_safe
  print(json.dumps(json_safe(obj), indent=1, allow_nan=False))


def _use_all_cores() -> None:
  # One XLA host device per core lets `simulate_many` shard orders over the cores; this
  # must happen before JAX starts its backend, and respects a user's own XLA_FLAGS.
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n or 1}").strip()


def _int_from(low: int, high: int = 2 ** 31 - 1):
  """An argparse type: an integer in [low, high] (argparse names the flag in its error)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not low <= value <= high:
      raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value}")
    return value
  parse.__name__ = "integer"
  return parse


def _finite(low: float = 0.0, high: float = float("inf"), *, open_low: bool = False):
  """An argparse type: a finite number in [low, high] ((low, high] with `open_low`)."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and (value > low if open_low else value >= low)
            and value <= high):
      side = "(" if open_low else "["
      raise argparse.ArgumentTypeError(f"must be a finite number in {side}{low:g}, {high:g}], "
                                       f"got {text}")
    return value
  parse.__name__ = "number"
  return parse


_SEED = _int_from(0)
_STEPS = _int_from(1, 10_000_000)


def _model_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("surrogate model")
  g.add_argument("--width", type=_int_from(1, 4096), default=32, help="residual width D (default 32)")
  g.add_argument("--depth", type=_int_from(1, 64), default=2, help="transformer blocks (default 2)")
  g.add_argument("--heads", type=_int_from(1, 256), default=2, help="attention heads (default 2)")
  g.add_argument("--length", type=_int_from(1, 4096), default=None,
                 help="context length in tokens (default: 32, or 64 when the median example "
                      "is longer than 32 tokens)")
  g.add_argument("--vocab", type=_int_from(3, 1_000_000), default=None,
                 help="size of the BPE trained on the fragments (default 512)")
  g.add_argument("--tokenizer", metavar="FILE",
                 help="the real model's tokenizer.json (Hugging Face `tokenizers`, BPE or "
                      "WordPiece): the surrogate then reads the fragments in the real model's "
                      "tokens, keeping only those that occur, instead of a BPE of its own")
  g.add_argument("--seed", type=_SEED, default=0, help="seed of the surrogate's initial weights")


def _model_cfg(args, frags):
  """(ModelConfig, the tokenizer it was sized with) from the surrogate options."""
  from surrogate.prepare import model_config_for
  shape = {"width": args.width, "depth": args.depth, "heads": args.heads}
  if args.tokenizer is None:
    try:  # ModelConfig checks the shape (heads must divide the width, ...)
      return model_config_for(frags, length=args.length, vocab_size=args.vocab or 512, **shape)
    except ValueError as e:
      raise UsageError(f"--width/--depth/--heads/--length/--vocab: {e}") from None
  if args.vocab is not None:
    raise UsageError("--vocab sizes the surrogate's own BPE; with --tokenizer the vocabulary "
                     "is the real tokenizer's tokens that occur")
  from tokenizers import Tokenizer
  try:
    real = Tokenizer.from_file(args.tokenizer)
  except Exception as e:  # tokenizers raises a bare Exception for unreadable files
    raise UsageError(f"--tokenizer {args.tokenizer}: not a readable tokenizer.json ({e})") from e
  try:
    return model_config_for(frags, length=args.length, real_tokenizer=real, **shape)
  except ValueError as e:
    raise UsageError(f"--tokenizer {args.tokenizer}: {e}") from e


def _parse_named(text: str | None, names: Sequence[str], what: str) -> list[float] | None:
  """'a=2,b=0.5' -> a value per fragment (missing ones 0)."""
  if text is None:
    return None
  values = {n: 0.0 for n in names}
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name not in values:
      raise UsageError(f"--{what}: unknown fragment {name!r} (fragments: {', '.join(names)})")
    try:
      values[name] = float(value)
    except ValueError:
      raise UsageError(f"--{what}: {part!r} is not NAME=NUMBER") from None
  return [values[n] for n in names]


def _floats(text: str | None, what: str, *, positive: bool = False) -> tuple[float, ...] | None:
  """'1,2.5,4' -> (1.0, 2.5, 4.0); None stays None."""
  if text is None or text == "":
    return None
  try:
    out = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise UsageError(f"--{what}: {text!r} is not a comma-separated list of numbers") from None
  if positive and not all(x > 0 and x < float("inf") for x in out):
    raise UsageError(f"--{what}: every value must be a finite number > 0, got {text!r}")
  return out


def _parse_list(text: str | None, names: Sequence[str], what: str) -> list[int] | None:
  if text is None:
    return None
  index = {n: i for i, n in enumerate(names)}
  out = []
  for name in text.split(","):
    if name not in index:
      raise UsageError(f"--{what}: unknown fragment {name!r} (fragments: {', '.join(names)})")
    out.append(index[name])
  return out


def cmd_orders(args) -> int:
  import jax

  from calibrate.io.runlog import RunLogWriter
  from surrogate import orders
  from surrogate.fragments import read_fragments
  frags = read_fragments(args.data)
  names = frags.names
  try:  # the spec checks its own values (positive weights, shares, steps): usage errors
    spec = orders.OrderSpec(
        kind=orders.OrderKind(args.kind),
        sequence=_parse_list(args.sequence, names, "sequence"),
        shares=_floats(args.shares, "shares"),
        weights=_parse_named(args.weights, names, "weights"),
        scores=_parse_named(args.scores, names, "scores"),
        keep=_parse_list(args.keep, names, "keep"),
        **({"ascending": not args.descending} if args.kind == "curriculum" else {}))
    order = spec.generate(frags.train_pools(), key=jax.random.key(args.seed), steps=args.steps,
                          batch_size=args.batch_size)
  except ValueError as e:
    # The spec names its field first ("shares must be ..."): name the flag that set it.
    field = str(e).split(" ", 1)[0].replace("_", "-")
    flag = f"--{field}" if field in {"sequence", "shares", "weights", "scores", "keep", "steps",
                                      "batch-size", "ascending"} else "--kind"
    raise UsageError(f"{flag}: {e}") from None
  optimizer = {"name": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
               "warmup_steps": args.warmup_steps, "schedule": args.schedule}
  header = {"run_id": args.run_id or f"{args.kind}-s{args.seed}", "model": "order",
            "optimizer": optimizer, "batch_size": args.batch_size, "seed": args.seed,
            "order_spec": spec.to_dict()}
  ids = [e.id for e in frags.examples]
  with RunLogWriter(args.out, header, frags, overwrite=args.force) as log:
    for t, row in enumerate(order):
      log.step(t, [ids[i] for i in row if i >= 0])
  if args.json:
    _print_json({"wrote": args.out, "kind": args.kind, "steps": args.steps,
                 "batch_size": args.batch_size, "order_spec": spec.to_dict()})
  else:
    print(f"wrote {args.out}: {args.kind} order, {args.steps} steps x {args.batch_size}")
  return 0


def _read_runs(paths: Sequence[str], frags) -> list:
  from calibrate.io.runlog import read_runlog
  return [read_runlog(p, frags) for p in paths]


def cmd_fit(args) -> int:
  from calibrate.fitting.fit import FitConfig, fit
  from calibrate.fitting.saved import save
  from surrogate.fragments import read_fragments
  teacher = _teacher(args)
  frags = read_fragments(args.data)
  runs = _read_runs(args.runs, frags)
  config = FitConfig(seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                     lr_scales=_floats(args.lr_scales, "lr-scales", positive=True),
                     distill_steps=args.distill_steps)
  cfg, tokenizer = _model_cfg(args, frags)
  sim = fit(frags, runs, model_cfg=cfg, config=config, key=_key(args.seed), tokenizer=tokenizer,
            teacher=teacher, progress=not args.quiet)
  save(sim, args.out)
  info = sim.fit_info
  if args.json:
    _print_json({"wrote": args.out, "model": dataclasses.asdict(cfg), "seeds": sim.num_seeds,
                 "fit": info.to_json()})
    return 0
  gain = info.gain
  loo = info.leave_one_run_out
  print(f"calibrated on {len(runs)} runs ({', '.join(info.calibration_runs)}) in "
        f"{info.seconds.total:.0f} s; surrogate {cfg.depth} x {cfg.width}, "
        f"{cfg.length} tokens per example, {sim.num_seeds} seeds, "
        + (f"the real tokenizer's {cfg.vocab_size - 2} tokens that occur" if args.tokenizer
           else f"a BPE of {cfg.vocab_size} tokens"))
  print(f"  learning-rate scale {info.lr_scale:g} (shape misfit per candidate: "
        + ", ".join(f"x{c.lr_scale:g}: {c.shape_misfit:.4f}" for c in info.knob_candidates)
        + ")")
  print(f"  common gain {gain.common_gain:.2f} +- {gain.common_gain_sd:.2f} "
        f"(weight of the runs against the prior: {gain.data_weight:.2f})")
  if gain.data_weight < 0.5:
    print("  the runs show little order effect (shuffled runs?), so the gain and the "
          "intervals rest on priors; one run of a structured order pins them (`surrogate "
          "next-run --sim " + args.out + "` suggests which)")
  if info.distillation is not None:
    d = info.distillation
    print(f"  distilled from the teacher ({d.teacher_model}) for {d.steps} steps: KL to its "
          f"next-token distributions {d.kl_before:.3f} -> {d.kl_after:.3f} nats")
  else:
    print("  not distilled from your base model: if it is a causal LM, `surrogate teach` and "
          "`fit --teacher` ranked orders and fragments better on every such set measured "
          "(docs/results.md)")
  if info.context is not None and info.context.examples_cut > 0:
    c = info.context
    worst = min(c.by_fragment, key=lambda r: r[2])
    print(f"  {c.examples_cut:.0%} of the examples are longer than the surrogate's "
          f"{c.length} tokens: it reads {c.tokens_seen:.0%} of their tokens (least: "
          f"{worst[0]}, {worst[2]:.0%}); `--length` reads more, at a cost (docs/results.md)")
  if sim.opt_cfg.adapter is not None:
    a = sim.opt_cfg.adapter
    print(f"  low-rank mode, as the runs trained LoRA adapters: rank {a.rank}, alpha "
          f"{a.alpha:g}, on the surrogate's {', '.join(a.targets)}")
  print(f"  fit MSE of fragment probe losses: {info.fit_mse:.5f}")
  if loo is not None:
    print(f"  leave-one-run-out MSE: {loo.mse:.5f} (order-agnostic mean: "
          f"{loo.order_agnostic_mse:.5f})")
  rho = info.train_fidelity
  if rho is not None:
    print(f"  the surrogate follows the evaluated train examples' dips with correlation "
          f"{rho:.2f} (LM-like development set 0.8, classification 0.4: lower means wider "
          "intervals)")
  err = info.effect_error
  print(f"  effect error {err.used:.3f} x each predicted order effect in the intervals "
        f"(prior {err.prior:.3g}" + ("" if err.leave_one_run_out is None else
                                     f", from the runs {err.leave_one_run_out:.3f}") + ")")
  print(f"wrote {args.out}")
  return 0


def cmd_teach(args) -> int:
  try:
    import transformers

    from calibrate.io.teacher import save_teacher, teach
  except ImportError as e:
    raise UsageError(f"surrogate teach runs the real model with torch: pip install "
                     f"'surrogate-sim[torch]' ({e})") from None
  from surrogate.fragments import read_fragments
  frags = read_fragments(args.data)
  tok_file = args.tokenizer or os.path.join(args.model, "tokenizer.json")
  if not os.path.isfile(tok_file):
    raise UsageError(f"{tok_file}: no tokenizer.json; name the real model's with --tokenizer")
  if not os.path.isfile(os.path.join(args.model, "config.json")):
    raise UsageError(f"{args.model}: not a Hugging Face model folder (no config.json)")
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file)
  model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype)
  neutral: list[str] = []
  if args.neutral:
    from surrogate.datasets import python_docs_neutral
    neutral = python_docs_neutral()[:args.neutral]
  t0 = time.perf_counter()
  teacher = teach(model, tokenizer, frags, tokenizer_file=tok_file, neutral_texts=neutral,
                  k=args.k, length=args.length, batch_size=args.batch_size,
                  progress=not args.quiet and not args.json)
  save_teacher(teacher, args.out)
  summary = {"wrote": args.out, "examples": teacher.num_examples, "neutral_texts": len(neutral),
             "k": teacher.k, "length": teacher.length, "seconds": time.perf_counter() - t0}
  if args.json:
    _print_json(summary)
  else:
    print(f"wrote {args.out}: the top {teacher.k} next tokens of {args.model} at each of the "
          f"first {teacher.length} positions of {teacher.num_examples} examples and "
          f"{len(neutral)} neutral texts ({summary['seconds']:.0f} s)")
  return 0


def _teacher(args):
  """The `--teacher` folder, read and checked against `--tokenizer`; with a teacher the
  surrogate reads the teacher's own tokenizer (set in `args.tokenizer`)."""
  if args.teacher is None:
    return None
  from calibrate.io.teacher import load_teacher, tokenizer_sha256
  teacher = load_teacher(args.teacher)
  own = os.path.join(args.teacher, "tokenizer.json")
  if args.tokenizer is not None:
    with open(args.tokenizer, encoding="utf-8") as f:
      sha = tokenizer_sha256(f.read())
    if sha != teacher.tokenizer_sha256:
      raise UsageError(f"--tokenizer {args.tokenizer} (sha256 {sha[:12]}...) is not the "
                       f"tokenizer --teacher {args.teacher} was made with (sha256 "
                       f"{teacher.tokenizer_sha256[:12]}..., {own}); leave --tokenizer out")
  if args.vocab is not None:
    raise UsageError("--vocab sizes the surrogate's own BPE; with --teacher the surrogate "
                     "reads the teacher's tokenizer")
  args.tokenizer = own
  return teacher


def cmd_tier(args) -> int:
  import jax
  import numpy as np

  from calibrate.fitting import analytic as tier_lib
  from calibrate.fitting.saved import load, save
  from calibrate.io.runlog import order_from_runlog
  from surrogate.errors import CalibrationError
  from surrogate.orders import order_sha256
  sim = load(args.sim)
  runs = _read_runs(args.runs, sim.fragments)
  orders = {order_sha256(order_from_runlog(r, sim.fragments)): r for r in runs}
  wanted = sim.fit_info.calibration_orders_sha256
  missing = [run_id for run_id, sha in zip(sim.fit_info.calibration_runs, wanted)
             if sha not in orders]
  if not wanted or missing:
    raise CalibrationError("the analytic tier is measured from the calibration orders' mean: "
                           "give every calibration run in --runs (missing: "
                           f"{missing or list(sim.fit_info.calibration_runs)})")
  cal = [order_from_runlog(orders[sha], sim.fragments) for sha in wanted]
  k_fit, k_check = jax.random.split(_key(args.seed))
  progress = not args.quiet and not args.json
  tier = tier_lib.fit_tier(sim, cal, key=k_fit, orders_per_family=args.orders_per_family,
                           steps=args.fit_steps, form=args.form or tier_lib.FORM,
                           progress=progress)
  tier = tier_lib.check_fidelity(sim, tier, key=k_check, orders=args.fresh, progress=progress)
  save(dataclasses.replace(sim, analytic=tier), args.sim)
  fid = tier.fidelity
  if args.json:
    _print_json({"wrote": args.sim, "fit_orders": tier.fit_orders, "seconds": tier.seconds,
                 "form": tier.form,
                 "fidelity": fid.to_json(), "trusted": tier.trusted})
    return 0
  print(f"analytic tier ({tier.form} form) fitted on {tier.fit_orders} simulated orders "
        f"({sim.num_seeds} seeds) "
        f"in {tier.seconds:.0f} s; checked on {fid.orders} fresh ones")
  print(f"  per-fragment Spearman {np.nanmean(fid.spearman_F):.3f} (transformer seeds "
        f"{np.nanmean(fid.seed_spearman_F):.3f})")
  print(f"  {fid.reason}")
  print(("the answers (`--tier auto`) now use it" if tier.trusted else
         "the answers (`--tier auto`) stay with the transformer; `--tier analytic` forces it")
        + f"; wrote {args.sim}")
  return 0


def cmd_validate(args) -> int:
  from calibrate.fitting.saved import load
  from calibrate.fitting.validate import validate
  sim = load(args.sim)
  report = validate(sim, _read_runs(args.runs, sim.fragments), level=args.level,
                    progress=not args.quiet and not args.json)
  print(report.to_json() if args.json else report.format_table())
  return 0


def cmd_what_if(args) -> int:
  from calibrate.answers.outcomes import OUTCOMES, compare, what_if
  from calibrate.fitting.saved import load
  sim = load(args.sim)
  runs = _read_runs(args.orders, sim.fragments)
  answers = [what_if(sim, r, key=_key(args.seed), level=args.level,
                     progress=not args.quiet and not args.json, tier=args.tier) for r in runs]
  ranking = compare(sim, {r.header.run_id: r for r in runs}, level=args.level,
                    tier=args.tier) if len(runs) > 1 else None
  if args.json:
    out = {"orders": [{
        "run_id": a.run_id, "steps": a.steps.tolist(), "fragments": list(a.fragments),
        "probe": a.probe_CxF.tolist(), "probe_lo": a.probe_lo_CxF.tolist(),
        "probe_hi": a.probe_hi_CxF.tolist(), "own_probe": a.own_probe_F.tolist(),
        "own_train": a.own_train_F.tolist(),
        "outcomes": {f: dict(zip([o.value for o in OUTCOMES], map(float, row)))
                     for f, row in zip(a.fragments, a.outcome_FxO)}} for a in answers],
           "tier": answers[0].tier, "tier_reason": answers[0].tier_reason}
    if ranking is not None:
      out["ranking"] = [{"run_id": n, "mean_final_probe": float(m), "lo": float(lo),
                         "hi": float(hi), "p_best": float(p)} for n, m, lo, hi, p in
                        zip(ranking.names, ranking.mean, ranking.lo, ranking.hi, ranking.p_best)]
    _print_json(out)
    return 0
  for a in answers:
    print(a.table())
    print()
  if ranking is not None:
    print(ranking.table())
  print(f"answered by the {answers[0].tier_reason}")
  return 0


def _simulate_calibrated(args) -> int:
  from calibrate.fitting.runs import predict_runs, predicted_runlogs
  from calibrate.fitting.saved import load
  from calibrate.io.runlog import write_runlog
  from calibrate.io.simulated import wanted_eval_steps
  from surrogate.errors import CalibrationError
  from surrogate.fragments import sha256_file
  sim = load(args.sim)
  if args.data and sha256_file(args.data) != sim.fragments.sha256:
    raise CalibrationError(f"{args.data} is not the fragments file the simulator was "
                           "calibrated on (sha256 differs)")
  runs = _read_runs(args.orders, sim.fragments)
  outs = [os.path.join(args.out, os.path.basename(p)) for p in args.orders]
  if len(set(outs)) < len(outs):
    raise CalibrationError("two inputs have the same file name; their predictions would "
                           "overwrite each other in --out")
  for src, dst in zip(args.orders, outs):
    if os.path.exists(dst) and os.path.samefile(src, dst):
      raise CalibrationError(f"--out would overwrite the input {src}; choose another folder")
  groups: dict[tuple, list[int]] = {}
  for i, r in enumerate(runs):
    key = (tuple(wanted_eval_steps(r)), r.num_steps, r.header.batch_size)
    groups.setdefault(key, []).append(i)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  written = []
  for members in groups.values():
    group = [runs[i] for i in members]
    pred = predict_runs(sim, group, progress=not args.quiet, chunk_size=args.chunk_size,
                        tier=args.tier)
    tier, reason = pred.tier, pred.tier_reason
    for i, log in zip(members, predicted_runlogs(sim, group, pred)):
      out = outs[i]
      write_runlog(out, log)
      bad = log.header.extra.get("diverged_seeds")
      written.append({"wrote": out, "run_id": log.header.run_id, "diverged_seeds": bad or []})
      if not args.json:
        print(f"wrote {out}" + (f" (surrogate seeds {bad} diverged)" if bad else ""))
  seconds = time.perf_counter() - t0
  if args.json:
    _print_json({"runs": written, "seconds": seconds, "seeds": sim.num_seeds,
                 "tier": tier, "tier_reason": reason})
  else:
    print(f"predicted {len(runs)} runs in {seconds:.1f} s ({sim.num_seeds} surrogate seeds "
          f"each); answered by the {reason}")
  return 0


def cmd_simulate(args) -> int:
  import jax

  if args.sim:
    return _simulate_calibrated(args)
  if args.tier != "auto":
    raise UsageError("--tier needs --sim (without it the raw surrogate simulates)")
  if not args.data:
    raise UsageError("give --sim (a fitted simulator) or --data")

  from calibrate.io.runlog import read_runlog, write_runlog
  from calibrate.io.simulated import simulate_runs
  from surrogate.fragments import read_fragments
  from surrogate.model import init_params
  from surrogate.prepare import prepare
  frags = read_fragments(args.data)
  runs = [read_runlog(p, frags) for p in args.orders]
  cfg, tokenizer = _model_cfg(args, frags)
  train_ids = sorted({i for r in runs for e in r.evals for i in e.losses
                      if frags.examples[frags.index[i]].split.value == "train"})
  eval_train = [frags.index[i] for i in train_ids] if train_ids else args.eval_train
  prep = prepare(frags, cfg, key=jax.random.key(args.seed), eval_train=eval_train,
                 tokenizer=tokenizer)
  params0 = init_params(jax.random.key(args.seed), cfg)
  t0 = time.perf_counter()
  sims = simulate_runs(prep, params0, runs, default_every=args.eval_every,
                       chunk_size=args.chunk_size, progress=not args.quiet,
                       model_name=f"surrogate-{cfg.depth}x{cfg.width}")
  elapsed = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  written = []
  for path, sim in zip(args.orders, sims):
    out = os.path.join(args.out, os.path.basename(path))
    write_runlog(out, sim)
    diverged = sim.header.extra.get("diverged_at_step")
    written.append({"wrote": out, "run_id": sim.header.run_id, "diverged_at_step": diverged})
    if not args.json:
      print(f"wrote {out}" + ("" if diverged is None else f" (diverged at step {diverged})"))
  if args.json:
    _print_json({"runs": written, "seconds": elapsed})
  else:
    print(f"simulated {len(runs)} runs in {elapsed:.1f} s (compilation included)")
  return 0


def _objective(text: str | None, sim):
  """`mean`, or NAME=WEIGHT,... for target fragments, checked against the simulator's."""
  from calibrate.answers.search import objective_weights
  if text is None or text == "mean":
    return "mean"
  out = {}
  for item in text.split(","):
    name, _, w = item.partition("=")
    try:
      out[name.strip()] = float(w)
    except ValueError:
      raise UsageError(f"--objective expects 'mean' or NAME=WEIGHT,...; got {item!r}") from None
  try:
    objective_weights(sim, out)
  except ValueError as e:
    raise UsageError(f"--objective: {e}") from None
  return out


def _named_orders(paths, sim):
  """{run_id: order} of order files or runs (None without paths)."""
  if not paths:
    return None
  from calibrate.io.runlog import order_from_runlog
  return {r.header.run_id: order_from_runlog(r, sim.fragments)
          for r in _read_runs(paths, sim.fragments)}


def _tier_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tier", choices=("auto", "analytic", "transformer"), default="auto",
                 help="which model answers: auto (default: the analytic tier where it passed "
                      "its trust check, else the transformer), analytic or transformer")


def _key(seed: int):
  import jax
  return jax.random.key(seed)


def _run_screen(sim, args):
  from calibrate.answers.screen import screen
  from surrogate.orders import FAMILIES
  families = args.family.split(",") if args.family != "all" else "all"
  unknown = [] if families == "all" else [f for f in families if f not in FAMILIES]
  if unknown:
    raise UsageError(f"--family: unknown {unknown}; expected 'all' or some of {list(FAMILIES)}")
  if args.orders < 2:
    raise UsageError(f"--orders: a screen needs at least 2 simulated runs, got {args.orders}")
  return screen(sim, n_orders=args.orders, family=families, key=_key(args.seed),
                diagnostics=not args.no_diagnostics, folder=args.results,
                resume=args.resume, progress=not args.quiet, tier=args.tier)


def cmd_screen(args) -> int:
  from calibrate.fitting.saved import load
  sim = load(args.sim)
  if args.resume and not args.results:
    raise UsageError("--resume needs --results DIR (where the killed screen streamed "
                     "its results)")
  from calibrate.answers.families import MEASURES, by_family, failure_points, interactions
  from calibrate.answers.screen import DIAGNOSTICS
  if args.by_family not in MEASURES:
    raise UsageError(f"--by-family: unknown measure {args.by_family!r}; expected one of "
                     f"{list(MEASURES)}")
  if args.no_diagnostics and args.by_family in DIAGNOSTICS:
    raise UsageError(f"--by-family {args.by_family} needs the diagnostics (--no-diagnostics "
                     "skips them)")
  sc = _run_screen(sim, args)
  view, fails, inter = by_family(sc), failure_points(sc), interactions(sc)
  if args.json:
    _print_json({**sc.to_json(), "by_family": view.to_json(),
                 "failure_points": [dataclasses.asdict(p) for p in fails],
                 "interactions": inter.to_json()})
  else:
    print(sc.table())
    print(f"{sc.seconds_per_order:.2f} s per simulated order (compilation included)\n")
    print(view.table(args.by_family))
    print("\nfailure points (share of orders; onset step, median [10%, 90%]; most common in)")
    for p in fails:
      print(f"  {p.fragment}: {p.kind} in {p.share:.0%} of {p.orders}, from step {p.step:.0f} "
            f"[{p.step_lo:.0f}, {p.step_hi:.0f}]; {p.worst_family} {p.worst_share:.0%}")
    print("\n" + inter.table())
  return 0


def cmd_search(args) -> int:
  from calibrate.fitting.saved import load
  sim = load(args.sim)
  start = _named_orders(args.start, sim)
  from calibrate.answers.search import gradient_search, search
  from surrogate.errors import CalibrationError
  if args.method == "gradient":
    if start:
      raise CalibrationError("--start is for the greedy search; gradient search starts from "
                             "uniform and random phase weights (--restarts)")
    result = gradient_search(sim, objective=_objective(args.objective, sim),
                             phases=args.phases, restarts=args.restarts, verify=args.verify,
                             key=_key(args.seed), progress=not args.quiet, tier=args.tier)
  else:
    result = search(sim, objective=_objective(args.objective, sim), budget=args.budget,
                    start=start, key=_key(args.seed), progress=not args.quiet, tier=args.tier)
  if args.out:
    result.save_order(sim, args.out, run_id=args.run_id)
  if args.json:
    _print_json({"ranked": [
        {"name": n, "score": float(sc), "interval": list(result.interval(i)),
         "spec": spec.to_dict() if spec is not None else None}
        for i, (n, sc, spec) in enumerate(zip(result.ranked.names, result.ranked.score_N,
                                              result.ranked.specs))],
        "p_best_top": result.p_best.tolist(), "start_best": result.start_best,
        "method": args.method,
        "phase_weights": {n: w.tolist() for n, w in result.phase_weights.items()},
        "tier": result.ranked.tier, "tier_reason": result.ranked.tier_reason})
  else:
    print(result.table())
    print(f"answered by the {result.ranked.tier_reason}")
  if args.out:
    print(f"wrote the best order to {args.out} (feed it with calibrate.io.hf.OrderedTrainer)",
          file=sys.stderr if args.json else sys.stdout)
  return 0


def cmd_next_run(args) -> int:
  from calibrate.fitting.saved import load
  sim = load(args.sim)
  cands = _named_orders(args.orders, sim)
  from calibrate.answers.search import next_run
  nr = next_run(sim, cands, objective=_objective(args.objective, sim),
                n_candidates=args.candidates, key=_key(args.seed), progress=not args.quiet,
                tier=args.tier)
  if args.out:
    nr.save_order(sim, args.out, run_id=args.run_id)
  if args.json:
    _print_json({"ranked": [
        {"name": n, "disagreement": float(d), "predicted": float(p),
         "spec": spec.to_dict() if spec is not None else None}
        for n, d, p, spec in zip(nr.ranked.names, nr.ranked.spread_N, nr.ranked.score_N,
                                 nr.ranked.specs)],
        "tier": nr.ranked.tier, "tier_reason": nr.ranked.tier_reason})
  else:
    print(nr.table())
    print(f"answered by the {nr.ranked.tier_reason}")
  if args.out:
    print(f"wrote the next run's order to {args.out}: run it for real with a recorder, then "
          "add it to `surrogate fit --runs`", file=sys.stderr if args.json else sys.stdout)
  return 0


def cmd_report(args) -> int:
  from calibrate.answers.report import trajectories_of, write_report
  from calibrate.fitting.saved import load
  sim = load(args.sim)
  runs = _read_runs(args.runs, sim.fragments) if args.runs else []
  sc = _run_screen(sim, args)
  from calibrate.answers.search import search
  result = search(sim, budget=args.budget, key=_key(args.seed), progress=not args.quiet,
                  tier=args.tier)
  plots = trajectories_of(sim, runs, progress=not args.quiet) if runs else []
  path = write_report(args.out, sim, screen=sc, search=result, trajectories=plots,
                      validation=_held_out_validation(sim, runs, quiet=args.quiet))
  if args.json:
    _print_json({"wrote": path, "screen": sc.to_json(), "best_order": (
        result.best_spec.to_dict() if result.best_spec is not None else None)})
  else:
    print(f"wrote {path}")
  return 0


def _held_out_validation(sim, runs, *, quiet: bool):
  """`validate` on the runs that did not calibrate `sim`, when they hold two orders."""
  from calibrate.fitting.validate import group_reruns, validate
  from calibrate.io.runlog import order_from_runlog
  from surrogate.orders import order_sha256
  cal = set(sim.fit_info.calibration_orders_sha256)
  held = [r for r in runs if r.evals and r.header.run_id not in sim.fit_info.calibration_runs
          and order_sha256(order_from_runlog(r, sim.fragments)) not in cal]
  if len(group_reruns(held)[0]) < 2:
    return None
  return validate(sim, held, progress=not quiet)


def cmd_demo(args) -> int:
  from calibrate.cli.demo import TorchMissing, run_demo
  kw = dict(n_orders=args.orders, out=args.out, seed=args.seed, budget=args.budget,
            length=args.length, calibrate=args.calibrate, check=args.check,
            save_sim=args.save_sim, tier=args.tier, teacher=not args.no_teacher)
  import contextlib
  import io
  import json
  try:
    if not args.json:
      return run_demo(progress=not args.quiet, **kw)
    with contextlib.redirect_stdout(io.StringIO()):  # the narrative; the summary is the result
      code = run_demo(progress=False, **kw)
  except TorchMissing as e:  # torch, to distil the base model when calibrating here
    raise UsageError(str(e)) from None
  with open(os.path.join(args.out, "summary.json"), encoding="utf-8") as f:
    _print_json(json.load(f))
  return code


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="surrogate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from calibrate.fitting.saved import package_version
  p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
  sub = p.add_subparsers(dest="command", required=True)

  o = sub.add_parser("orders", help="write an order file (a RunLog without evals)")
  o.add_argument("--data", required=True, help="fragments file (JSON Lines)")
  o.add_argument("--kind", required=True, help="the order's family",
                 choices=["shuffled", "blocked", "interleaved", "mixture", "curriculum", "subset"])
  o.add_argument("--sequence", help="blocked/interleaved: fragment names, comma-separated")
  o.add_argument("--shares", help="blocked: relative block lengths, comma-separated")
  o.add_argument("--weights", help="mixture: NAME=WEIGHT,... (missing fragments: 0)")
  o.add_argument("--scores", help="curriculum: NAME=SCORE,... (low first)")
  o.add_argument("--descending", action="store_true", help="curriculum: high scores first")
  o.add_argument("--keep", help="subset: fragment names to feed, comma-separated")
  o.add_argument("--steps", type=_STEPS, required=True, help="optimizer steps in the order")
  o.add_argument("--batch-size", type=_int_from(1, 100_000), required=True, help="examples per step")
  o.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"],
                 help="the real run's optimizer, written in the header (default adamw)")
  o.add_argument("--lr", type=_finite(0.0, open_low=True), default=1e-3, help="peak learning rate (default 1e-3)")
  o.add_argument("--weight-decay", type=_finite(), default=0.0, help="weight decay (default 0)")
  o.add_argument("--warmup-steps", type=_int_from(0, 10_000_000), default=0, help="linear warmup steps (default 0)")
  o.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                 help="learning-rate schedule after warmup (default constant)")
  o.add_argument("--seed", type=_SEED, default=0, help="seed of the order's randomness")
  o.add_argument("--run-id", help="run id in the header (default KIND-sSEED)")
  o.add_argument("--out", required=True, help="order file to write")
  o.add_argument("--force", action="store_true", help="overwrite an existing file")
  o.add_argument("--json", action="store_true", help="print what was written as JSON")
  o.set_defaults(func=cmd_orders)

  f = sub.add_parser("fit", help="calibrate the surrogate to real runs; write a simulator")
  f.add_argument("--data", required=True, help="fragments file the runs were recorded on")
  f.add_argument("--runs", nargs="+", required=True, help="calibration RunLogs (2-4 is typical)")
  f.add_argument("--out", required=True, help="folder for the simulator")
  f.add_argument("--seeds", type=_int_from(1, 1024), default=4, help="surrogate seeds in the ensemble (4)")
  f.add_argument("--pretrain-steps", type=_int_from(0, 10_000_000), default=800,
                 help="pre-training steps on neutral text per seed (800)")
  f.add_argument("--lr-scales", default=None,
                 help="candidate learning-rate scales of the surrogate, comma-separated "
                      "(default: 2 with a 32-token context, 3 with 64, the rates that ranked "
                      "best on the development sets; e.g. 1,2,4 to choose by the loss "
                      "curves' shape)")
  f.add_argument("--teacher", metavar="DIR",
                 help="a teacher folder (`surrogate teach`): the surrogate reads the real "
                      "tokenizer's tokens and is distilled towards the real base model's "
                      "next-token distributions after pre-training")
  f.add_argument("--distill-steps", type=_int_from(0, 10_000_000), default=800,
                 help="distillation steps per seed with --teacher (800)")
  f.add_argument("--json", action="store_true", help="print how the fit went as JSON")
  f.add_argument("--quiet", action="store_true", help="no progress bar")
  _model_args(f)
  f.set_defaults(func=cmd_fit)

  ti = sub.add_parser("tier", help="fit the analytic tier on the simulator's own simulations, "
                                   "check it against them, and save it in the folder")
  ti.add_argument("--sim", required=True, help="folder written by `surrogate fit` (updated)")
  ti.add_argument("--runs", nargs="+", required=True,
                  help="the calibration runs (the tier is measured from their orders' mean)")
  ti.add_argument("--orders-per-family", type=_int_from(1, 100_000), default=12,
                  help="random orders of each family to fit on (default 12, as measured in "
                       "docs/results.md)")
  ti.add_argument("--fresh", type=_int_from(4, 100_000), default=64,
                  help="fresh orders of the trust check (default 64)")
  ti.add_argument("--fit-steps", type=_int_from(1, 1_000_000), default=2000,
                  help="optimizer steps of the fit (default 2000)")
  ti.add_argument("--form", choices=("plain", "adam", "latent"),
                  help="the tier's form (default: the library's, `calibrate.fitting.analytic."
                       "FORM`; docs/concepts.md)")
  ti.add_argument("--seed", type=_SEED, default=0, help="draws the fit's and the check's orders")
  ti.add_argument("--json", action="store_true", help="print the fit and its check as JSON")
  ti.add_argument("--quiet", action="store_true", help="no progress bar")
  ti.set_defaults(func=cmd_tier)

  v = sub.add_parser("validate", help="accuracy of a simulator on held-out real runs")
  v.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  v.add_argument("--runs", nargs="+", required=True, help="held-out RunLogs (not calibration)")
  v.add_argument("--level", type=_finite(0.0, 1.0, open_low=True), default=0.8, help="interval level for coverage (0.8)")
  v.add_argument("--json", action="store_true", help="print the figures as JSON")
  v.add_argument("--quiet", action="store_true", help="no progress bar")
  v.set_defaults(func=cmd_validate)

  w = sub.add_parser("what-if", help="predicted outcome of every fragment under given orders")
  w.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  w.add_argument("--orders", nargs="+", required=True,
                 help="order files or runs; with several, they are also ranked")
  w.add_argument("--level", type=_finite(0.0, 1.0, open_low=True), default=0.8, help="interval level (0.8)")
  w.add_argument("--seed", type=_SEED, default=0,
                 help="draws the counterfactuals' replacement examples (default 0)")
  w.add_argument("--json", action="store_true", help="print JSON")
  w.add_argument("--quiet", action="store_true", help="no progress bar")
  _tier_arg(w)
  w.set_defaults(func=cmd_what_if)

  s = sub.add_parser("simulate", help="simulate order files or runs; write simulated RunLogs")
  s.add_argument("--sim", help="a fitted simulator: predict real-scale RunLogs with intervals")
  s.add_argument("--data", help="fragments file (required without --sim; checked with it)")
  s.add_argument("--orders", nargs="+", required=True, help="order files or RunLogs")
  s.add_argument("--out", required=True, help="folder for the simulated RunLogs")
  s.add_argument("--eval-every", type=_STEPS, default=20,
                 help="eval spacing for inputs without evals (default 20)")
  s.add_argument("--eval-train", type=_int_from(0, 1_000_000), default=4,
                 help="train examples evaluated per fragment when the inputs name none")
  s.add_argument("--chunk-size", type=_int_from(1, 1_000_000),
                 help="orders per compiled call (default: 2 per CPU device, 64 per accelerator)")
  s.add_argument("--json", action="store_true", help="print what was written as JSON")
  s.add_argument("--quiet", action="store_true", help="no progress bar")
  _tier_arg(s)
  _model_args(s)
  s.set_defaults(func=cmd_simulate)

  def screen_args(p):
    p.add_argument("--orders", type=_int_from(2, 100_000_000), default=256,
                   help="simulated runs, counterfactuals included (default 256)")
    p.add_argument("--family", default="all",
                   help="order families, comma-separated, or 'all' (default)")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the diagnostics")
    p.add_argument("--results", help="stream the simulations' results into this folder")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed screen from --results (same inputs and --seed)")
    p.add_argument("--seed", type=_SEED, default=0, help="draws the orders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _tier_arg(p)

  sc = sub.add_parser("screen", help="outcome probabilities, interference and failure points "
                                     "of every fragment over many simulated orders")
  sc.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  screen_args(sc)
  sc.add_argument("--by-family", default="probe_drop", metavar="MEASURE",
                  help="the measure shown per order family against shuffling: probe_drop "
                       "(default), own_contribution, P(generalizes), ..., starved or a "
                       "diagnostic's name (--json has them all)")
  sc.add_argument("--json", action="store_true", help="print JSON")
  sc.set_defaults(func=cmd_screen)

  se = sub.add_parser("search", help="search feeding orders for the best predicted outcome")
  se.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  se.add_argument("--budget", type=_int_from(1, 1_000_000), default=32,
                  help="candidate orders to simulate, each from every seed (default 32)")
  se.add_argument("--objective", default="mean",
                  help="'mean' (all fragments' final probe loss) or NAME=WEIGHT,...")
  se.add_argument("--method", choices=("greedy", "gradient"), default="greedy",
                  help="greedy: local search over order families (default); gradient: per-phase "
                       "mixture weights optimised through the analytic tier, the best checked "
                       "by the transformer (needs a tier: `surrogate tier`)")
  se.add_argument("--phases", type=_int_from(1, 1000), default=4,
                  help="gradient: phases with their own mixture weights (default 4)")
  se.add_argument("--restarts", type=_int_from(1, 10_000), default=8,
                  help="gradient: optimisations from different starts (default 8)")
  se.add_argument("--verify", type=_int_from(0, 1000), default=4,
                  help="gradient: the tier's best orders the transformer checks (default 4)")
  se.add_argument("--start", nargs="+", help="order files or runs to start from (greedy)")
  se.add_argument("--out", help="write the best order here (an order file)")
  se.add_argument("--run-id", default="searched", help="run id of the written order")
  se.add_argument("--seed", type=_SEED, default=0,
                  help="draws the start set, the variations and the orders (default 0)")
  se.add_argument("--json", action="store_true", help="print JSON")
  se.add_argument("--quiet", action="store_true", help="no progress bar")
  _tier_arg(se)
  se.set_defaults(func=cmd_search)

  nx = sub.add_parser("next-run", help="the real run that would teach the simulator most")
  nx.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  nx.add_argument("--orders", nargs="+", help="candidate order files (default: random ones)")
  nx.add_argument("--candidates", type=_int_from(1, 1_000_000), default=12,
                  help="random candidates when --orders is not given (default 12)")
  nx.add_argument("--objective", default="mean", help="as for `surrogate search`")
  nx.add_argument("--out", help="write the chosen order here (an order file)")
  nx.add_argument("--run-id", default="next-run", help="run id of the written order")
  nx.add_argument("--seed", type=_SEED, default=0,
                  help="draws the candidates and their orders (default 0)")
  nx.add_argument("--json", action="store_true", help="print JSON")
  nx.add_argument("--quiet", action="store_true", help="no progress bar")
  _tier_arg(nx)
  nx.set_defaults(func=cmd_next_run)

  rp = sub.add_parser("report", help="screen, search and write the HTML report")
  rp.add_argument("--sim", required=True, help="folder written by `surrogate fit`")
  rp.add_argument("--runs", nargs="+", help="real runs to plot against their predictions; "
                  "those that did not calibrate are validated too (with the verdicts of a "
                  "counterfactual family among them)")
  rp.add_argument("--budget", type=_int_from(1, 1_000_000), default=16, help="search budget (default 16)")
  rp.add_argument("--out", required=True, help="folder for report.html and its PNGs")
  rp.add_argument("--json", action="store_true",
                  help="print the report's path, the screen and the best order as JSON")
  screen_args(rp)
  rp.set_defaults(func=cmd_report)

  te = sub.add_parser("teach", help="the real base model's next-token distributions on the "
                                    "fragments, for the surrogate to learn (needs [torch])")
  te.add_argument("--model", required=True, help="the real base model's folder (Hugging Face)")
  te.add_argument("--data", required=True, help="fragments file")
  te.add_argument("--out", required=True, help="folder for the teacher file")
  te.add_argument("--tokenizer", help="the model's tokenizer.json (default: MODEL/tokenizer.json)")
  te.add_argument("--k", type=_int_from(1, 4096), default=32,
                  help="next tokens kept per position (32)")
  te.add_argument("--length", type=_int_from(2, 100_000), default=64,
                  help="tokens read per example (64)")
  te.add_argument("--neutral", type=_int_from(0, 1_000_000), default=0,
                  help="also this many neutral texts (Python's manual) (0)")
  te.add_argument("--batch-size", type=_int_from(1, 4096), default=8,
                  help="texts per forward pass (8)")
  te.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                  default="float32",
                  help="the dtype the model runs in (default float32; auto: its config's; "
                       "bfloat16 halves the memory on a GPU)")
  te.add_argument("--json", action="store_true", help="print what was written as JSON")
  te.add_argument("--quiet", action="store_true", help="no progress bar")
  te.set_defaults(func=cmd_teach)

  d = sub.add_parser("demo", help="the main job on the bundled real runs: the calibrated "
                                   "simulator, its analytic tier checked, screen, search, "
                                   "check against held-out runs, report")
  d.add_argument("--orders", type=_int_from(2, 100_000_000), default=None,
                 help="simulated runs in the screen, counterfactuals included (default 10,000 "
                      "through the analytic tier, 128 through the transformer)")
  d.add_argument("--calibrate", action="store_true",
                 help="calibrate on the real runs and fit the analytic tier here instead of "
                      "loading the bundled simulator (about 28 minutes on 2 cores)")
  d.add_argument("--check", type=_int_from(0, 100_000), default=8,
                 help="fresh orders the demo checks the analytic tier on, with every seed "
                      "(default 8; 0 keeps the stored check of 64)")
  d.add_argument("--no-teacher", action="store_true",
                 help="a surrogate not distilled from the real base model (the bundled one is; "
                      "calibrates here; docs/results.md compares the two)")
  d.add_argument("--save-sim", default=None, metavar="DIR",
                 help="also save the simulator used, analytic tier included, in DIR")
  d.add_argument("--budget", type=_int_from(1, 1_000_000), default=8,
                 help="candidate orders the search simulates, each from every seed (default 8)")
  d.add_argument("--length", type=_int_from(1, 4096), default=None,
                 help="the surrogate's tokens per example (default: fit's, 64 on this data; "
                      "32 is about twice as fast and ranks worse)")
  d.add_argument("--out", default="surrogate-demo", help="folder for the report and results")
  d.add_argument("--seed", type=_SEED, default=0,
                 help="drives the surrogate seeds and every drawn order (default 0; another "
                      "seed calibrates here, as --calibrate)")
  _tier_arg(d)
  d.add_argument("--json", action="store_true",
                 help="print the summary (summary.json) as JSON instead of the narrative")
  d.add_argument("--quiet", action="store_true", help="no progress bars")
  d.set_defaults(func=cmd_demo)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns its exit status (2 for bad input, with one line on stderr)."""
  parser = build_parser()
  args = parser.parse_args(argv)  # a usage error exits 2 here, as argparse does
  _use_all_cores()
  from surrogate.errors import CalibrationError, DataError
  try:
    return args.func(args)
  except UsageError as e:
    print(f"surrogate {args.command}: error: {e}", file=sys.stderr)
  except (DataError, CalibrationError) as e:
    print(f"error: {e}", file=sys.stderr)
  except OSError as e:  # a missing, unreadable or unwritable file, named
    where = e.filename if e.filename is not None else ""
    print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
