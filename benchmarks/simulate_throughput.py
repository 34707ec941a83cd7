"""Throughput of the simulator on a realistic workload, beside this machine's matmul peak.

Workload: the bundled 17-fragment data set (Python reference manual), 200 steps of batch 16,
orders from every family (as `surrogate demo` draws them), evals every 25 steps.

Prints, each measured in its own process (so compile time and peak memory are its own):
  * the float32 matmul peak: one process, and two processes at once (their sum);
  * per surrogate configuration: compile time, orders/second at each N, achieved GFLOP/s
    and its share of the peak, peak resident memory;
  * side by side in one run: one XLA device vs one per core (sharded), and vmap vs a loop;
  * fidelity of each cheaper configuration: Spearman correlation, across orders, of each
    fragment's final probe-loss drop against a bigger reference surrogate on the same orders.

  python benchmarks/simulate_throughput.py            # N = 1, 64 (about 20 minutes)
  python benchmarks/simulate_throughput.py --full     # adds N = 1024 for the default
  python benchmarks/simulate_throughput.py --fidelity-orders 0   # speed only (about 10 minutes)
  python benchmarks/simulate_throughput.py --widths-only  # share of the peak at widths 32-128
  python benchmarks/simulate_throughput.py --flax-vs-hand  # the flax model vs the hand-rolled one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _sharing_mode(share: bool | None):
  """A job's "share" (None: automatic, True: forced, False: off) as `simulate.Sharing`."""
  from surrogate.simulate import Sharing
  return {None: Sharing.AUTO, True: Sharing.ALWAYS, False: Sharing.NEVER}[share]
STEPS, BATCH, EVAL_EVERY = 200, 16, 25


def _env(devices: int) -> dict:
  env = dict(os.environ)
  # One single-threaded XLA device per core: measured faster here than Eigen's threads.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_cpu_multi_thread_eigen=false")
  return env


def _run_worker(job: dict, devices: int = 2) -> dict:
  out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=_env(devices),
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"worker {job} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Workers (run in a subprocess).


def _peak_worker(job: dict) -> dict:
  import jax
  import jax.numpy as jnp
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(job.get("repeats", 30)):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return {"gflops": 2 * n**3 / sorted(times)[len(times) // 2] / 1e9}


def _workload(cfg_kw: dict, n: int, seed: int = 0):
  import jax
  import numpy as np

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.datasets import python_docs
  from surrogate.orders import FAMILIES, random_spec
  from surrogate.prepare import prepare
  frags = python_docs()
  cfg = model_lib.ModelConfig(**cfg_kw)
  prep = prepare(frags, cfg, key=jax.random.key(0))
  pools = frags.train_pools()
  keys = jax.random.split(jax.random.key(seed), n)
  orders = []
  for i, k in enumerate(keys):
    ks, kg = jax.random.split(k)
    spec = random_spec(FAMILIES[i % len(FAMILIES)], len(frags.names), key=ks)
    orders.append(spec.generate(pools, key=kg, steps=STEPS, batch_size=BATCH))
  opt = optim.OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, schedule="linear")
  return prep, cfg, opt, np.stack(orders)


def _flops(cfg, prep, n, plan) -> float:
  checkpoints = len(plan.checkpoint_steps(STEPS))
  m = prep.data.eval_idx_M.shape[0]
  train = cfg.train_flops_per_token() * STEPS * BATCH * cfg.length
  evals = cfg.forward_flops_per_token() * cfg.length * m * checkpoints
  if plan.diagnostics:
    evals += cfg.forward_flops_per_token() * cfg.length * prep.data.probes.tokens_PxL1.shape[0] * checkpoints
  return n * (train + evals)


def _sim_worker(job: dict) -> dict:
  import resource

  import jax
  import numpy as np

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.simulate import SimPlan, default_chunk_size, simulate, simulate_many
  n = job["n"]
  prep, cfg, opt, orders = _workload(job["cfg"], n + 1)  # the extra order warms up
  if job.get("branch_at"):
    # Groups of `branches` orders that feed the same batches up to step `branch_at`.
    g = job["branches"]
    for i in range(n):
      orders[i, :job["branch_at"]] = orders[i - i % g, :job["branch_at"]]
  plan = SimPlan(eval_every=job.get("eval_every", EVAL_EVERY),
                 diagnostics=job.get("diagnostics", True))
  params0 = model_lib.init_params(jax.random.key(1), cfg)
  lr = optim.learning_rates(opt, STEPS)
  devices = jax.devices()[: job.get("devices", len(jax.devices()))]
  chunk = job.get("chunk") or default_chunk_size(devices)
  result = {"job": job}
  if job.get("loop"):
    one = jax.jit(lambda o: simulate(params0, optim.Knobs.identity(), o, lr, prep.data,
                                     model_cfg=cfg, opt_cfg=opt, plan=plan))
    t = time.perf_counter()
    jax.block_until_ready(one(orders[-1]))
    result["compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for o in orders[:n]:
      jax.block_until_ready(one(o))
    seconds = time.perf_counter() - t
  else:
    kw = {"model_cfg": cfg, "opt_cfg": opt, "plan": plan, "chunk_size": min(chunk, n),
          "devices": devices, "progress": False, "sharing": _sharing_mode(job.get("share"))}
    # Warm up (compile) on a separate order of the same chunk shape, then time N fresh ones.
    warm = orders[-1:].repeat(min(chunk, n), 0)
    t = time.perf_counter()
    simulate_many(params0, optim.Knobs.identity(), warm, lr, prep.data, **kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    traj = simulate_many(params0, optim.Knobs.identity(), orders[:n], lr, prep.data, **kw)
    seconds = time.perf_counter() - t
    result["compile_s"] = first - seconds * min(chunk, n) / n
    if job.get("keep_all"):
      result["eval_loss_NxCxM"] = traj.eval_loss_CxM.tolist()
    if job.get("keep_final"):
      probe = traj.eval_loss_CxM @ np.asarray(prep.data.probe_weight_FxM).T
      result["drop_NxF"] = (probe[:, 0] - probe[:, -1]).tolist()
  result.update(seconds=seconds, orders_per_s=n / seconds, s_per_order=seconds / n,
                gflops=_flops(cfg, prep, n, plan) / seconds / 1e9,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  return result


def _example_worker(job: dict) -> dict:
  """docs/simulator.md's branching example in a fresh process, compilation included."""
  import jax
  import numpy as np

  from surrogate import model as model_lib
  from surrogate import optim, orders
  from surrogate.simulate import SimPlan, simulate_many
  prep, cfg, opt, _ = _workload(DEFAULT, 1)
  pools = prep.fragments.train_pools()
  base = orders.shuffled(pools, key=jax.random.key(0), steps=STEPS, batch_size=BATCH)
  tails = [orders.subset(pools, [f], key=jax.random.key(f), steps=50, batch_size=BATCH)
           for f in range(len(pools))]
  variants = np.stack([np.concatenate([base[:STEPS - 50], tail]) for tail in tails])
  t = time.perf_counter()
  simulate_many(model_lib.init_params(jax.random.key(1), cfg), optim.Knobs.identity(), variants,
                optim.learning_rates(opt, STEPS), prep.data, model_cfg=cfg, opt_cfg=opt,
                plan=SimPlan(eval_every=EVAL_EVERY), progress=False,
                sharing=_sharing_mode(job["share"]))
  return {"seconds": time.perf_counter() - t, "n": len(variants)}


def _hand_forward(params, inputs_BxL, cfg, *, capture=False):
  """The hand-rolled forward surrogate/model.py had before its flax module (kept verbatim,
  helpers inlined), the reference of `--flax-vs-hand`."""
  import math

  import jax
  import jax.numpy as jnp

  from surrogate import model as model_lib

  def lift(v, like):
    return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)

  def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * lift(scale, x) + lift(bias, x)

  b, l = inputs_BxL.shape
  h, hd = cfg.heads, cfg.head_dim
  x_BxLxD = params["embed_VxD"][inputs_BxL] + params["pos_LxD"][None, :l]
  causal_LxL = jnp.tril(jnp.ones((l, l), bool))
  attns = []
  blocks = params["blocks"]
  for k in range(cfg.depth):
    p = jax.tree.map(lambda a: a[k], blocks)
    y = layer_norm(x_BxLxD, p["ln1_scale_KxD"], p["ln1_bias_KxD"])
    qkv = y @ p["qkv_KxDx3D"] + lift(p["qkv_bias_Kx3D"], y)
    q, kk, v = jnp.split(qkv.reshape(b, l, 3, h, hd), 3, axis=2)
    q, kk, v = (a[:, :, 0] for a in (q, kk, v))  # each BxLxHxhd
    scores_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd)
    scores_BxHxLxL = jnp.where(causal_LxL[None, None], scores_BxHxLxL, -1e9)
    attn_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    if capture:
      attns.append(attn_BxHxLxL)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", attn_BxHxLxL, v).reshape(b, l, cfg.width)
    x_BxLxD = x_BxLxD + ctx @ p["proj_KxDxD"] + lift(p["proj_bias_KxD"], ctx)
    y = layer_norm(x_BxLxD, p["ln2_scale_KxD"], p["ln2_bias_KxD"])
    y = jax.nn.gelu(y @ p["fc_KxDxM"] + lift(p["fc_bias_KxM"], y), approximate=True)
    x_BxLxD = x_BxLxD + y @ p["out_KxMxD"] + lift(p["out_bias_KxD"], y)
  hidden_BxLxD = layer_norm(x_BxLxD, params["lnf_scale_D"], params["lnf_bias_D"])
  logits_BxLxV = hidden_BxLxD @ params["embed_VxD"].T
  if capture:
    return logits_BxLxV, model_lib.Captured(jnp.stack(attns), hidden_BxLxD)
  return logits_BxLxV


def _flax_vs_hand_worker(job: dict) -> dict:
  """The simulator and a vmapped train step compiled once with each forward, timed in turns.

  Each program is compiled ahead of time with `model_lib.forward` set to one implementation
  (jit caches cleared between), so both sit in one process and the rounds alternate (the
  order swapped each round): machine load falls on both alike. The simulator is `simulate`
  vmapped over a chunk of orders sharded over the devices, fed chunk after chunk, as
  `simulate_many` runs it (shared initial params and knobs).
  """
  import functools

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.simulate import SimPlan, default_chunk_size, simulate
  flax_forward = model_lib.forward
  impls = {"hand": _hand_forward, "flax": flax_forward}
  n, rounds = job["n"], job["rounds"]
  prep, cfg, opt, orders = _workload(job["cfg"], n)
  plan = SimPlan(eval_every=EVAL_EVERY)
  params0 = model_lib.init_params(jax.random.key(1), cfg)
  knobs = optim.Knobs.identity()
  lr_T = np.asarray(optim.learning_rates(opt, STEPS), np.float32)
  devices = jax.devices()
  chunk = default_chunk_size(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("orders",))
  put_sharded = lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec("orders")))
  put_rep = lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec()))
  data, params0, knobs = put_rep(prep.data), put_rep(params0), put_rep(knobs)
  chunks = [(put_sharded(orders[i:i + chunk]), put_sharded(np.tile(lr_T, (chunk, 1))))
            for i in range(0, n, chunk)]
  one = functools.partial(simulate, model_cfg=cfg, opt_cfg=opt, plan=plan)
  sim_chunk = lambda p, k, o_NxTxB, lr_NxT, d: jax.vmap(
      lambda o, lr: one(p, k, o, lr, d))(o_NxTxB, lr_NxT)
  # The train step alone: loss and gradient of one batch per order, N orders' own params.
  b = BATCH
  params_N = put_sharded(jax.vmap(lambda k: model_lib.init_params(k, cfg))(
      jax.random.split(jax.random.key(2), n)))
  rows = np.asarray(prep.data.tokens_ExL1)[orders[:, 0] % prep.data.tokens_ExL1.shape[0]]
  masks = np.asarray(prep.data.mask_ExL)[orders[:, 0] % prep.data.mask_ExL.shape[0]]
  tokens_NxBxL1, mask_NxBxL = put_sharded(rows[:, :b]), put_sharded(masks[:, :b])

  compiled, compile_s, sim_out, step_out = {}, {}, {}, {}
  for name, fwd in impls.items():
    jax.clear_caches()
    model_lib.forward = fwd  # what simulate, example_losses and the diagnostics call
    try:
      t = time.perf_counter()
      sim = jax.jit(sim_chunk).lower(params0, knobs, *chunks[0], data).compile()
      step = jax.jit(jax.vmap(jax.value_and_grad(
          lambda p, x, m: model_lib.batch_loss(p, x, m, cfg)))).lower(
              params_N, tokens_NxBxL1, mask_NxBxL).compile()
      compile_s[name] = time.perf_counter() - t
    finally:
      model_lib.forward = flax_forward
    # The patch took: only the flax program's source metadata names the module.
    assert ("Transformer.__call__" in sim.as_text()) == (name == "flax"), name
    compiled[name] = (sim, step)
    sim_out[name] = jax.device_get([sim(params0, knobs, *c, data) for c in chunks])
    step_out[name] = jax.device_get(step(params_N, tokens_NxBxL1, mask_NxBxL))

  times = {name: {"sim": [], "step": []} for name in impls}
  for r in range(rounds):
    for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
      sim, step = compiled[name]
      t = time.perf_counter()
      for c in chunks:
        jax.block_until_ready(sim(params0, knobs, *c, data))
      times[name]["sim"].append((time.perf_counter() - t) / n)
      t = time.perf_counter()
      for _ in range(job["step_repeats"]):
        jax.block_until_ready(step(params_N, tokens_NxBxL1, mask_NxBxL))
      times[name]["step"].append((time.perf_counter() - t) / job["step_repeats"])
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return {"times": times, "compile_s": compile_s, "chunk": chunk, "devices": len(devices),
          "sim_diff": diff(sim_out["flax"], sim_out["hand"]),
          "step_diff": diff(step_out["flax"], step_out["hand"]),
          "bitwise": all(np.array_equal(x, y) for x, y in zip(
              jax.tree.leaves((sim_out["flax"], step_out["flax"])),
              jax.tree.leaves((sim_out["hand"], step_out["hand"]))))}


# ----------------------------------------------------------------------------------------------
# Driver.


def _spearman_mean(a, b) -> float:
  import numpy as np
  from scipy.stats import spearmanr
  a, b = np.asarray(a), np.asarray(b)
  return float(np.nanmean([spearmanr(a[:, f], b[:, f])[0] for f in range(a.shape[1])]))


DEFAULT = {"width": 32, "length": 32}
LEVERS = {
    "default (D=32, L=32)": {"cfg": DEFAULT},
    "no diagnostics": {"cfg": DEFAULT, "diagnostics": False},
    "16 tokens (D=32, L=16)": {"cfg": {"width": 32, "length": 16}},
    "narrow (D=16, L=32)": {"cfg": {"width": 16, "length": 32, "heads": 1}},
    "narrow, 16 tokens": {"cfg": {"width": 16, "length": 16, "heads": 1}},
    "evals every 50 steps": {"cfg": DEFAULT, "eval_every": 50},
    "16 tok, no diag, evals/50": {"cfg": {"width": 32, "length": 16}, "diagnostics": False,
                                  "eval_every": 50},
    "narrow16, no diag, ev/50": {"cfg": {"width": 16, "length": 16, "heads": 1},
                                 "diagnostics": False, "eval_every": 50},
}
# Levers that leave the trajectories at the checkpoints they keep as they are: their
# fidelity is that of the configuration named.
SAME_TRAJECTORIES = {"no diagnostics": "default (D=32, L=32)",
                     "evals every 50 steps": "default (D=32, L=32)",
                     "16 tok, no diag, evals/50": "16 tokens (D=32, L=16)",
                     "narrow16, no diag, ev/50": "narrow, 16 tokens"}
REFERENCE = {"width": 64, "length": 64, "heads": 4}
# Wider surrogates, for where the share of the matmul peak is reached (not speed levers:
# each costs more per order). N is smaller for the slow ones, to keep the run short.
WIDTHS = [("D=32, L=32 (default)", DEFAULT, 64),
          ("D=64, L=32, 2 heads", {"width": 64, "length": 32, "heads": 2}, 32),
          ("D=128, L=32, 4 heads", {"width": 128, "length": 32, "heads": 4}, 16),
          ("D=128, L=64, 4 heads", {"width": 128, "length": 64, "heads": 4}, 8)]


def _sharing(n: int = 32) -> None:
  """Prefix sharing side by side: off, on, and on where nothing is shared (its overhead)."""
  import numpy as np
  print(f"\n## prefix sharing (default configuration, N = {n}, groups of 4 orders alike up to "
        "a step)")
  rows = [("no common prefix, sharing off", {"share": False}),
          ("no common prefix, sharing forced", {"share": True})]
  for at in (100, 150):
    rows += [(f"alike to step {at}, sharing off", {"share": False, "branch_at": at}),
             (f"alike to step {at}, sharing on", {"share": True, "branch_at": at})]
  ex = {share: _run_worker({"example": True, "share": share}) for share in (False, True)}
  print(f"docs/simulator.md's example ({ex[True]['n']} orders alike for 150 steps), a fresh "
        f"process, compilation included: {ex[False]['seconds']:.1f} s without sharing, "
        f"{ex[True]['seconds']:.1f} s with", flush=True)
  base = {}
  for label, job in rows:
    r = _run_worker({"cfg": DEFAULT, "n": n, "branches": 4, "keep_all": True, **job})
    loss = np.asarray(r["eval_loss_NxCxM"])
    key = job.get("branch_at", 0)
    if not job["share"]:
      base[key] = (r["s_per_order"], loss)
      print(f"{label:<36}{r['s_per_order']:>9.3f} s/order", flush=True)
    else:
      s0, l0 = base[key]
      print(f"{label:<36}{r['s_per_order']:>9.3f} s/order  {s0 / r['s_per_order']:.2f}x; largest "
            f"eval-loss difference {np.nanmax(np.abs(loss - l0)):.1e}", flush=True)


FLAX_VS_HAND = {"width": 32, "length": 64, "depth": 2}  # the LM default: 64 tokens


def _flax_vs_hand(n: int, rounds: int) -> None:
  """The flax module against the hand-rolled forward it replaced, side by side in one process."""
  import statistics
  job = {"flax_vs_hand": True, "cfg": FLAX_VS_HAND, "n": n, "rounds": rounds, "step_repeats": 20}
  r = _run_worker(job)
  print(f"\n## flax module vs hand-rolled forward (D=32, L=64, K=2, batch {BATCH}; "
        f"{r['devices']} XLA devices, one per core; N = {n} orders in chunks of {r['chunk']}; "
        f"{rounds} rounds, alternated)")
  print(f"{'median over rounds':<40}{'hand-rolled':>12}{'flax':>12}{'flax/hand':>11}")
  for key, label, unit in [("sim", f"simulate, {STEPS} steps + evals", "s/order"),
                           ("step", "train step (loss+grad, vmapped)", "ms")]:
    scale = 1e3 if unit == "ms" else 1.0
    med = {name: statistics.median(r["times"][name][key]) * scale for name in ("hand", "flax")}
    lo_hi = {name: (min(r["times"][name][key]) * scale, max(r["times"][name][key]) * scale)
             for name in ("hand", "flax")}
    print(f"{label + ' (' + unit + ')':<40}{med['hand']:>12.4f}{med['flax']:>12.4f}"
          f"{med['flax'] / med['hand']:>10.3f}x   range hand {lo_hi['hand'][0]:.4f}-"
          f"{lo_hi['hand'][1]:.4f}, flax {lo_hi['flax'][0]:.4f}-{lo_hi['flax'][1]:.4f}")
  print(f"{'trace + compile, both programs (s)':<40}{r['compile_s']['hand']:>12.1f}"
        f"{r['compile_s']['flax']:>12.1f}{r['compile_s']['flax'] / r['compile_s']['hand']:>10.3f}x")
  print(f"largest difference: trajectories {r['sim_diff']:.1e}, train-step loss and grads "
        f"{r['step_diff']:.1e} (bitwise equal: {r['bitwise']})")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--full", action="store_true", help="also N = 1024 for the default")
  p.add_argument("--fidelity-orders", type=int, default=48, help="0: skip the fidelity part")
  p.add_argument("--memory-n", type=int, help="only this: time and peak memory of N orders")
  p.add_argument("--length", type=int, default=32, help="surrogate tokens for --memory-n")
  p.add_argument("--sharing-only", action="store_true", help="only the prefix-sharing rows")
  p.add_argument("--widths-only", action="store_true",
                 help="only the matmul peak and the share of it reached by wider surrogates")
  p.add_argument("--flax-vs-hand", action="store_true",
                 help="only this: the flax model against the hand-rolled forward, side by side")
  p.add_argument("--flax-vs-hand-orders", type=int, default=8, help="N for --flax-vs-hand")
  p.add_argument("--flax-vs-hand-rounds", type=int, default=7, help="rounds for --flax-vs-hand")
  p.add_argument("--levers", help="only these configurations (';'-separated names, as "
                 "printed), without the side-by-side, sharing and fidelity parts")
  args = p.parse_args()
  if args.worker:
    job = json.loads(args.worker)
    worker = (_peak_worker if job.get("peak") else _example_worker if job.get("example")
              else _flax_vs_hand_worker if job.get("flax_vs_hand") else _sim_worker)
    print(json.dumps(worker(job)))
    return
  sys.path.insert(0, os.path.dirname(HERE))
  print(f"# simulate_throughput  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}")
  if args.memory_n:
    r = _run_worker({"cfg": {"width": 32, "length": args.length}, "n": args.memory_n})
    print(f"N = {args.memory_n}, {args.length} tokens, default chunk: {r['seconds']:.0f} s "
          f"({r['s_per_order']:.3f} s/order), peak RSS {r['peak_rss_gb']:.2f} GB")
    return
  if args.sharing_only:
    _sharing()
    return
  if args.flax_vs_hand:
    _flax_vs_hand(args.flax_vs_hand_orders, args.flax_vs_hand_rounds)
    return
  one = _run_worker({"peak": True}, devices=1)["gflops"]
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps({"peak": True})],
                            env=_env(1), stdout=subprocess.PIPE, text=True) for _ in range(2)]
  two = sum(json.loads(pr.communicate()[0].strip().splitlines()[-1])["gflops"] for pr in procs)
  peak = max(one, two)
  print(f"matmul peak float32 (1024^3): 1 process {one:.0f} GFLOP/s, 2 processes at once "
        f"{two:.0f} GFLOP/s in all -> peak {peak:.0f}")

  if args.widths_only:
    print("\n## share of the peak by width (2 XLA devices, one per core; no speed levers)")
    for name, cfg, n in WIDTHS:
      r = _run_worker({"cfg": cfg, "n": n})
      print(f"{name:<26}{n:>6}{r['s_per_order']:>9.3f} s/order{r['gflops']:>9.1f} GFLOP/s"
            f"{100 * r['gflops'] / peak:>7.0f}%", flush=True)
    return

  print("\n## throughput (2 XLA devices, one per core)")
  print(f"{'configuration':<26}{'N':>6}{'s/order':>9}{'orders/s':>9}{'GFLOP/s':>9}{'% peak':>8}"
        f"{'compile s':>10}{'RSS GB':>8}")
  ns = {"default (D=32, L=32)": [1, 64] + ([1024] if args.full else [])}
  chosen = args.levers.split(";") if args.levers else list(LEVERS)
  for name in chosen:
    job = LEVERS[name]
    for n in ns.get(name, [64]):
      r = _run_worker({**job, "n": n})
      print(f"{name:<26}{n:>6}{r['s_per_order']:>9.3f}{r['orders_per_s']:>9.2f}{r['gflops']:>9.1f}"
            f"{100 * r['gflops'] / peak:>7.0f}%{r['compile_s']:>10.1f}{r['peak_rss_gb']:>8.2f}",
            flush=True)

  if args.levers:
    return
  print("\n## side by side (default configuration, N = 32)")
  for label, job, devices in [("1 device, vmap", {"devices": 1}, 2), ("2 devices, vmap", {}, 2),
                              ("2 devices, chunks of 32", {"chunk": 32}, 2),
                              ("1 device, Python loop", {"devices": 1, "loop": True}, 1)]:
    r = _run_worker({"cfg": DEFAULT, "n": 32, **job}, devices=devices)
    print(f"{label:<26}{r['s_per_order']:>9.3f} s/order{r['orders_per_s']:>8.2f} orders/s", flush=True)

  _sharing()
  if not args.fidelity_orders:
    return
  print(f"\n## fidelity against a reference surrogate (D=64, L=64), {args.fidelity_orders} orders")
  ref = _run_worker({"cfg": REFERENCE, "n": args.fidelity_orders, "keep_final": True})
  print(f"{'reference (D=64, L=64)':<26}{ref['s_per_order']:>9.3f} s/order")
  for name, job in LEVERS.items():
    if name in SAME_TRAJECTORIES:
      print(f"{name:<26}  (the trajectories of {SAME_TRAJECTORIES[name]} at its checkpoints)")
      continue
    r = _run_worker({**job, "n": args.fidelity_orders, "keep_final": True})
    rho = _spearman_mean(r["drop_NxF"], ref["drop_NxF"])
    print(f"{name:<26}{r['s_per_order']:>9.3f} s/order   Spearman(final probe drop) vs "
          f"reference, mean over fragments: {rho:.3f}", flush=True)


if __name__ == "__main__":
  main()
