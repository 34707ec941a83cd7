"""How simulation cost grows with the number of orders and the data set, and a kill -9 test
at scale (issue 6's figures).

Every measurement runs in a fresh process (its peak RSS is the process's), streaming results
to disk with `surrogate.store.simulate_to_folder`, one chunk file per 1,024 orders.

1. Orders: N = 100 ... 100,000 with a *tiny* surrogate (1 block of width 16, 8 tokens,
   vocabulary 300; 20 steps of batch 4 on the bundled 17 fragments), so that 10^5 orders fit
   in minutes here; seconds per order and peak memory show the growth. The default surrogate
   costs about 1 s per order here (results.md), so the same N would take 250x longer; its
   memory is bounded the same way (by the chunk).
2. Data set: N = 2,048 orders of the tiny surrogate on 4 ... 68 fragments of 20 ... 80 train
   examples (paragraphs of Python's reference manual, grouped), every probe evaluated.
3. Kill: a 10,000-order job is killed with SIGKILL at a random moment, resumed, and checked:
   every order's results present once, in order, for exactly its order (each chunk's sha256
   of its orders), and three random chunks re-simulated from scratch are identical.

  python benchmarks/scale.py                 # all three, about 15 minutes here
  python benchmarks/scale.py --max-n 10000 --skip-kill
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

CHUNK = 1024
STEPS, BATCH, EVERY = 20, 4, 10


def _setup(num_fragments: int | None, per_fragment: int, n: int, seed: int = 0):
  import jax
  import numpy as np

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.datasets import python_docs
  from surrogate.fragments import Example, Fragments, Split
  from surrogate.prepare import prepare
  from surrogate.simulate import SimPlan
  cfg = model_lib.ModelConfig(vocab_size=300, length=8, width=16, depth=1, heads=1, mlp_ratio=2)
  frags = python_docs(max_train=per_fragment, max_probe=max(2, per_fragment // 4))
  if num_fragments is not None and num_fragments != len(frags.names):
    # Regroup the manual's paragraphs into `num_fragments` fragments of `per_fragment`.
    train = [e for e in frags.examples if e.split is Split.TRAIN]
    probe = [e for e in frags.examples if e.split is Split.PROBE]
    # Paragraphs may recur across fragments (under other ids): this measures cost, not
    # learning.
    rng = random.Random(seed)
    examples = []
    for f in range(num_fragments):
      for s, pool, k in ((Split.TRAIN, train, per_fragment), (Split.PROBE, probe, 2)):
        for j, e in enumerate(rng.sample(pool, k)):
          examples.append(Example(f"f{f}-{s.value}-{j}", f"f{f}", s, text=e.text))
    frags = Fragments.from_examples(examples)
  prep = prepare(frags, cfg, key=jax.random.key(seed), eval_train=2, diag_probes=1)
  opt = optim.OptimizerConfig(lr=3e-3, warmup_steps=2, schedule="linear")
  # N random orders (every slot a random train example, as a uniform mixture with
  # repetition feeds): distinct, and cheap to make at 10^5.
  train = np.concatenate(frags.train_pools())
  orders_NxTxB = np.random.default_rng(seed).choice(train, (n, STEPS, BATCH)).astype(np.int32)
  params = model_lib.init_params(jax.random.key(seed + 2), cfg)
  return (frags, prep, params, orders_NxTxB, optim.learning_rates(opt, STEPS), cfg, opt,
          SimPlan(eval_every=EVERY, diagnostics=False))


def one(n: int, num_fragments: int | None, per_fragment: int, folder: str, resume: bool) -> dict:
  """Simulates n orders into `folder` (in this process); returns time and memory."""
  from surrogate import optim
  from surrogate.store import simulate_to_folder
  frags, prep, params, orders_, lrs, cfg, opt, plan = _setup(num_fragments, per_fragment, n)
  t0 = time.perf_counter()
  # A chunk is padded to full size, so a job smaller than a chunk takes a smaller chunk.
  traj = simulate_to_folder(folder, params, optim.Knobs.identity(), orders_, lrs, prep.data,
                            model_cfg=cfg, opt_cfg=opt, plan=plan, chunk_size=min(CHUNK, n),
                            resume=resume, progress=False)
  seconds = time.perf_counter() - t0
  return {"n": n, "fragments": len(frags.names), "examples": len(frags.examples),
          "evaluated": int(prep.data.eval_idx_M.shape[0]), "seconds": seconds,
          "seconds_per_order": seconds / n,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "results_mb": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
          / 2**20, "finite": bool((traj.eval_loss_CxM == traj.eval_loss_CxM).all())}


def _child(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def kill_test(n: int, root: str) -> dict:
  import numpy as np

  from surrogate import optim
  from surrogate.orders import order_sha256
  from surrogate.store import load_results, simulate_to_folder
  folder = os.path.join(root, "killed")
  total = -(-n // CHUNK)
  rng = random.Random()
  # Kill at a random moment inside the job: after a random number k of chunks is written,
  # plus a random part of one chunk's time.
  k = rng.randint(1, total - 2)
  child = subprocess.Popen([sys.executable, __file__, "--one", str(n), "-", "20", folder, "0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.perf_counter()
  count = lambda: sum(f.startswith("chunk-") for f in os.listdir(folder)) \
      if os.path.isdir(folder) else 0
  while count() < k and child.poll() is None:
    time.sleep(0.01)
  per_chunk = (time.perf_counter() - t0) / k
  time.sleep(rng.uniform(0.0, 0.9) * per_chunk)
  delay = time.perf_counter() - t0
  child.send_signal(signal.SIGKILL)
  child.wait()
  chunks = sorted(f for f in os.listdir(folder) if f.startswith("chunk-"))
  assert len(chunks) < total, "the job finished before the kill"
  partial = [f for f in os.listdir(folder) if f.endswith(".tmp")]
  t0 = time.perf_counter()
  _child([str(n), "-", "20", folder, "1"])
  t_resume = time.perf_counter() - t0
  _, prep, params, orders_, lrs, cfg, opt, plan = _setup(None, 20, n)
  traj = load_results(folder, orders_)          # checks every chunk's range and order sha256
  assert traj.eval_loss_CxM.shape[0] == n
  names = sorted(f for f in os.listdir(folder) if f.startswith("chunk-"))
  assert names == [f"chunk-{i:06d}.npz" for i in range(-(-n // CHUNK))]
  for i in random.Random(1).sample(range(len(names)), 3):
    sel = slice(i * CHUNK, min((i + 1) * CHUNK, n))
    fresh = simulate_to_folder(os.path.join(root, f"fresh-{i}"), params, optim.Knobs.identity(),
                               orders_[sel], lrs, prep.data, model_cfg=cfg, opt_cfg=opt,
                               plan=plan, chunk_size=CHUNK, progress=False)
    np.testing.assert_array_equal(fresh.eval_loss_CxM, traj.eval_loss_CxM[sel])
    np.testing.assert_array_equal(fresh.train_loss_T, traj.train_loss_T[sel])
    with np.load(os.path.join(folder, names[i])) as z:
      assert str(z["orders_sha256"]) == order_sha256(orders_[sel])
  return {"n": n, "killed_after_s": delay, "chunks_done_at_kill": len(chunks),
          "chunks_total": len(names), "half_written_files_at_kill": len(partial),
          "resume_seconds": t_resume, "resimulated_chunks_identical": 3,
          "orders_lost_or_duplicated": 0}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--one", nargs=5, metavar=("N", "FRAGMENTS", "PER_FRAGMENT", "FOLDER", "RESUME"),
                 help=argparse.SUPPRESS)
  p.add_argument("--max-n", type=int, default=100_000)
  p.add_argument("--skip-kill", action="store_true")
  p.add_argument("--json", help="write the figures to this file")
  args = p.parse_args()
  if args.one:
    n, f, per, folder, resume = args.one
    print(json.dumps(one(int(n), None if f == "-" else int(f), int(per), folder, resume == "1")))
    return
  out = {"orders": [], "dataset": [], "kill": None}
  root = tempfile.mkdtemp(prefix="scale-")
  try:
    print(f"tiny surrogate, {STEPS} steps of batch {BATCH}, chunks of {CHUNK} orders; each row a "
          "fresh process")
    print(f"{'N':>8}{'s / order':>11}{'total s':>9}{'peak RSS GB':>13}{'results MB':>12}")
    n = 100
    while n <= args.max_n:
      r = _child([str(n), "-", "20", os.path.join(root, f"n{n}"), "0"])
      out["orders"].append(r)
      print(f"{n:8d}{r['seconds_per_order']:11.4f}{r['seconds']:9.1f}{r['peak_rss_gb']:13.2f}"
            f"{r['results_mb']:12.1f}", flush=True)
      n *= 10
    print(f"\n{'fragments':>10}{'examples':>10}{'evaluated':>11}{'s / order':>11}"
          f"{'peak RSS GB':>13}  (N = 2048)")
    for f, per in ((4, 20), (17, 20), (17, 80), (68, 20), (68, 80)):
      r = _child(["2048", str(f), str(per), os.path.join(root, f"d{f}-{per}"), "0"])
      out["dataset"].append(r)
      print(f"{r['fragments']:10d}{r['examples']:10d}{r['evaluated']:11d}"
            f"{r['seconds_per_order']:11.4f}{r['peak_rss_gb']:13.2f}", flush=True)
    if not args.skip_kill:
      k = kill_test(10_000, root)
      out["kill"] = k
      print(f"\nkill -9 after {k['killed_after_s']:.0f} s of a {k['n']}-order job: "
            f"{k['chunks_done_at_kill']} of {k['chunks_total']} chunks done, "
            f"{k['half_written_files_at_kill']} half-written file(s); resumed in "
            f"{k['resume_seconds']:.0f} s; every chunk present once for its own orders, 3 random "
            "chunks re-simulated from scratch identical")
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
