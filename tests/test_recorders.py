"""Recorders: a tiny real torch model trained a few steps; the logs match what was fed."""

import math

import numpy as np
import pytest

from calibrate.io.recorders import Recorder
from calibrate.io.runlog import order_from_runlog, read_runlog
from surrogate import orders
from surrogate.datasets import python_docs
from surrogate.errors import RunLogError

torch = pytest.importorskip("torch")

OPT = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def frags():
  return python_docs(("try", "import", "async"), max_train=6, max_probe=2)


def _order(frags, steps, batch):
  import jax
  return orders.shuffled(frags.train_pools(), key=jax.random.key(0), steps=steps,
                         batch_size=batch)


def test_plain_torch_loop_recorder(frags, tmp_path):
  torch.manual_seed(0)
  emb = torch.nn.EmbeddingBag(50, 4)
  head = torch.nn.Linear(4, 1)
  params = list(emb.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1e-2)
  order = _order(frags, 5, 3)
  ids = [e.id for e in frags.examples]
  feats = {e.id: torch.tensor([len(e.text) % 50, hash(e.fragment) % 50]) for e in frags.examples}
  path = tmp_path / "plain.jsonl"
  with Recorder(path, frags, run_id="plain", model="bag", optimizer=OPT, batch_size=3) as rec:
    for t, row in enumerate(order):
      batch = [ids[i] for i in row]
      loss = head(emb(torch.stack([feats[i] for i in batch]))).pow(2).mean()
      opt.zero_grad()
      loss.backward()
      opt.step()
      assert rec.step(batch, loss, 1e-2) == t
    with torch.no_grad():
      rec.eval(5, {i: head(emb(feats[i][None])).pow(2).item() for i in ids[:4]})
  log = read_runlog(path, frags)
  assert log.num_steps == 5 and log.eval_steps == (5,)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert all(math.isfinite(s.loss) and s.lr == 1e-2 for s in log.steps)


def test_optax_loop_recorder(frags, tmp_path):
  import jax
  import jax.numpy as jnp
  import optax
  ids = [e.id for e in frags.examples]
  feats = jnp.asarray([[len(e.text) / 100.0, float(frags.index[e.id] % 3)] for e in frags.examples])
  params = {"w": jnp.zeros(2)}
  opt = optax.sgd(0.1)
  state = opt.init(params)
  loss_fn = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
  order = _order(frags, 4, 2)
  path = tmp_path / "optax.jsonl"
  with Recorder(path, frags, run_id="optax", model="linear",
                optimizer={"name": "sgd", "lr": 0.1}, batch_size=2) as rec:
    for row in order:
      loss, grads = jax.value_and_grad(loss_fn)(params, feats[row])
      updates, state = opt.update(grads, state)
      params = optax.apply_updates(params, updates)
      rec.step([ids[i] for i in row], loss, 0.1)  # a jax scalar is fine
  log = read_runlog(path, frags)
  np.testing.assert_array_equal(order_from_runlog(log, frags), order)
  assert log.steps[-1].loss < log.steps[0].loss


def test_recorder_rejects_bad_input_and_keeps_log_valid(frags, tmp_path):
  path = tmp_path / "bad.jsonl"
  train_id = frags.examples[int(frags.train_pools()[0][0])].id
  probe_id = frags.examples[int(frags.probe_indices()[0])].id
  with Recorder(path, frags, run_id="bad", model="m", optimizer=OPT, batch_size=1) as rec:
    rec.step([train_id], 1.0)
    with pytest.raises(RunLogError, match="nope"):
      rec.step(["nope"], 1.0)
    with pytest.raises(RunLogError, match="probe"):
      rec.step([probe_id], 1.0)
    with pytest.raises(RunLogError, match="loss"):
      rec.step([train_id], float("nan"))
    with pytest.raises(RunLogError, match="step"):
      rec.step([train_id], 1.0, step=5)
    rec.step([train_id], 0.5)
  log = read_runlog(path, frags)
  assert [s.loss for s in log.steps] == [1.0, 0.5]
