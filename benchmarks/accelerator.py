"""The simulator on an accelerator: orders per second at large N, memory, agreement with the CPU.

The same workload as `simulate_throughput.py` (the bundled 17 fragments, 200 steps of batch
16, orders of every family, evals every 25 steps, diagnostics on), the default surrogate,
all orders of a chunk in one vmapped call on the first accelerator. Prints:

  * the device's float32 matmul rate (8192^3), at full float32 precision and at XLA's
    default precision (TF32 on NVIDIA GPUs), the ceilings the simulator is compared with;
  * for each N: seconds per order, orders per second, achieved GFLOP/s and its share of
    both ceilings, compile time, the device's peak memory;
  * agreement: a few orders simulated on the accelerator and on the host CPU, the largest
    difference of their per-example eval losses (default and full float32 precision).

  python benchmarks/accelerator.py                     # N = 64, 1024, 4096
  python benchmarks/accelerator.py --ns 64 --check 2   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def _median_seconds(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def matmul_peak(device, n: int = 8192, repeats: int = 10) -> dict:
  """Float32 matmul GFLOP/s on `device` at 'highest' and 'default' precision."""
  import jax
  import jax.numpy as jnp
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
  out = {}
  for precision in ("highest", "default"):
    f = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
    out[precision] = 2 * n**3 / _median_seconds(functools.partial(f, a, b), repeats) / 1e9
  return out


def _peak_bytes(device) -> int | None:
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ns", default="64,1024,4096", help="numbers of orders, comma-separated")
  p.add_argument("--chunk", type=int, help="orders per compiled call (default: the library's)")
  p.add_argument("--check", type=int, default=8, help="orders compared with the host CPU (0: skip)")
  p.add_argument("--matmul-size", type=int, default=8192, help="side of the peak-rate matmul")
  p.add_argument("--json", help="also write the figures to this file")
  args = p.parse_args()

  import jax
  import numpy as np
  from simulate_throughput import EVAL_EVERY, STEPS, _flops, _workload

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.simulate import SimPlan, default_chunk_size, simulate_many

  device = jax.devices()[0]
  report = {"date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
            "device": f"{device.platform}: {device.device_kind}", "runs": []}
  print(f"# accelerator  {report['date']}  jax {jax.__version__}  device {report['device']}",
        flush=True)
  peak = matmul_peak(device, args.matmul_size)
  report["matmul_gflops"] = peak
  print(f"matmul float32 {args.matmul_size}^3: {peak['highest']:.0f} GFLOP/s at full precision, "
        f"{peak['default']:.0f} at the default precision", flush=True)

  ns = [int(x) for x in args.ns.split(",")]
  cfg_kw = {"width": 32, "length": 32}
  prep, cfg, opt, orders = _workload(cfg_kw, max(ns) + max(args.check, 1))
  plan = SimPlan(eval_every=EVAL_EVERY)
  params0 = model_lib.init_params(jax.random.key(1), cfg)
  lr = optim.learning_rates(opt, STEPS)
  knobs = optim.Knobs.identity()

  print(f"\n{'N':>6}{'chunk':>7}{'s/order':>10}{'orders/s':>10}{'GFLOP/s':>9}{'% fp32':>8}"
        f"{'% dflt':>8}{'compile s':>10}{'peak GB':>9}", flush=True)
  for n in ns:
    chunk = min(args.chunk or default_chunk_size([device]), n)
    kw = {"model_cfg": cfg, "opt_cfg": opt, "plan": plan, "chunk_size": chunk,
          "devices": [device], "progress": False}
    t = time.perf_counter()
    simulate_many(params0, knobs, orders[-1:].repeat(chunk, 0), lr, prep.data, **kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    simulate_many(params0, knobs, orders[:n], lr, prep.data, **kw)
    seconds = time.perf_counter() - t
    gflops = _flops(cfg, prep, n, plan) / seconds / 1e9
    peak_b = _peak_bytes(device)
    row = {"n": n, "chunk": chunk, "seconds": seconds, "s_per_order": seconds / n,
           "orders_per_s": n / seconds, "gflops": gflops,
           "compile_s": first - seconds * chunk / n,
           "peak_gb": None if peak_b is None else peak_b / 2**30}
    report["runs"].append(row)
    print(f"{n:>6}{chunk:>7}{row['s_per_order']:>10.5f}{row['orders_per_s']:>10.1f}{gflops:>9.0f}"
          f"{100 * gflops / peak['highest']:>7.1f}%{100 * gflops / peak['default']:>7.1f}%"
          f"{row['compile_s']:>10.1f}{(row['peak_gb'] or float('nan')):>9.2f}", flush=True)

  if args.check:
    sel = orders[:args.check]
    kw = {"model_cfg": cfg, "opt_cfg": opt, "plan": plan, "chunk_size": args.check,
          "progress": False}
    cpu = simulate_many(params0, knobs, sel, lr, prep.data, devices=jax.devices("cpu")[:1], **kw)
    report["agreement"] = {}
    for precision in ("default", "highest"):
      with jax.default_matmul_precision(precision):
        acc = simulate_many(params0, knobs, sel, lr, prep.data, devices=[device], **kw)
      diff = np.abs(acc.eval_loss_CxM - cpu.eval_loss_CxM)
      rel = float(np.linalg.norm(acc.eval_loss_CxM - cpu.eval_loss_CxM)
                  / np.linalg.norm(cpu.eval_loss_CxM))
      report["agreement"][precision] = {"max_abs": float(diff.max()), "rel_norm": rel}
      print(f"agreement with the host CPU over {args.check} orders, {precision} precision: "
            f"largest eval-loss difference {diff.max():.2e} nats, relative norm {rel:.1e}",
            flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(report, fh, indent=1)


if __name__ == "__main__":
  main()
