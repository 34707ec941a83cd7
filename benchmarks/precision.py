"""bfloat16 against float32 for the surrogate's training step on this machine.

One lever of issue 2: the default surrogate (2 x 32, 32 tokens, vocabulary 512) trained in
bfloat16 (parameters cast at the start of the step; the optimizer keeps float32) beside
float32, on the benchmark workload's batches (16 examples of the bundled data). Prints the
median time of one optimizer step in each, measured alternately in one process, and the
cost in fidelity: the largest difference of per-example eval losses after 200 steps of the
same order, beside the order effect being simulated (the difference between two shuffles).

  python benchmarks/precision.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from surrogate import model as model_lib
  from surrogate import optim
  from surrogate.datasets import python_docs
  from surrogate.orders import shuffled
  from surrogate.prepare import prepare

  steps, batch = 200, 16
  frags = python_docs()
  cfg = model_lib.ModelConfig()
  prep = prepare(frags, cfg, key=jax.random.key(0))
  order, other = (shuffled(frags.train_pools(), key=jax.random.key(k), steps=steps,
                           batch_size=batch) for k in (1, 4))
  opt_cfg = optim.OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, schedule="linear")
  opt = optim.make_optimizer(opt_cfg)
  lr_T = optim.learning_rates(opt_cfg, steps)
  tokens, mask = prep.data.tokens_ExL1, prep.data.mask_ExL

  def make_step(dtype):
    def loss(params, idx):
      p = jax.tree.map(lambda a: a.astype(dtype), params)
      return model_lib.batch_loss(p, tokens[idx], mask[idx].astype(dtype), cfg).astype(jnp.float32)

    def step(state, xs):
      params, opt_state = state
      idx, lr = xs
      grads = jax.grad(loss)(params, idx)
      updates, opt_state = opt.update(grads, opt_state, params, lr, opt_cfg.weight_decay)
      return (jax.tree.map(jnp.add, params, updates), opt_state), None
    return step

  def train(dtype):
    return jax.jit(lambda p, o: jax.lax.scan(make_step(dtype), (p, opt.init(p)), (o, lr_T))[0][0])

  evals = prep.data.eval_idx_M

  def eval_losses(params):
    return np.asarray(model_lib.example_losses(params, tokens[evals], mask[evals], cfg))

  p_a = model_lib.init_params(jax.random.key(2), cfg)
  order, other = jnp.asarray(order), jnp.asarray(other)
  runs = {"float32": train(jnp.float32), "bfloat16": train(jnp.bfloat16)}
  for f in runs.values():
    jax.block_until_ready(f(p_a, order))  # compile
  times = {k: [] for k in runs}
  for _ in range(5):
    for k, f in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(f(p_a, order))
      times[k].append((time.perf_counter() - t) / steps)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"# precision  {time.strftime('%Y-%m-%d %H:%M')}  one XLA CPU device, one thread")
  for k, v in med.items():
    print(f"{k:<10} {1e3 * v:7.2f} ms per training step (median of 5 runs of {steps} steps)")
  print(f"bfloat16 / float32 time: {med['bfloat16'] / med['float32']:.2f}")
  ref = eval_losses(runs["float32"](p_a, order))
  low = eval_losses(runs["bfloat16"](p_a, order))
  alt = eval_losses(runs["float32"](p_a, other))
  print(f"after {steps} steps, per-example eval loss: bfloat16 vs float32 largest difference "
        f"{np.abs(low - ref).max():.3f} nats (mean {np.abs(low - ref).mean():.3f}); another "
        f"shuffle in float32 (the order effect): largest {np.abs(alt - ref).max():.3f} "
        f"(mean {np.abs(alt - ref).mean():.3f})")


if __name__ == "__main__":
  main()
