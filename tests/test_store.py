"""Resumable simulation: chunks written atomically, kill -9 and resume, tampering."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from surrogate import model as model_lib
from surrogate import optim, orders
from surrogate.datasets import python_docs
from surrogate.prepare import prepare
from surrogate.simulate import SimPlan, simulate_many
from surrogate.store import ProcessShare, ResultsError, load_results, simulate_to_folder

# Distinct sizes: N=10 orders in chunks of 4 (a padded tail of 2), T=7, B=3, L=12, D=16.
CFG = model_lib.ModelConfig(vocab_size=300, length=12, width=16, depth=1, heads=2, mlp_ratio=2)
OPT = optim.OptimizerConfig(lr=3e-3, warmup_steps=1, schedule="linear")
PLAN = SimPlan(eval_every=3, eval_chunk=5, diagnostics=True)
N, T, B, CHUNK = 10, 7, 3, 4


def _inputs(n=N):
  frags = python_docs(("try", "import", "async"), max_train=9, max_probe=4)
  prep = prepare(frags, CFG, key=jax.random.key(0), eval_train=2, diag_probes=2)
  params = model_lib.init_params(jax.random.key(1), CFG)
  order_NxTxB = np.stack([orders.shuffled(frags.train_pools(), key=jax.random.key(i), steps=T,
                                          batch_size=B) for i in range(n)])
  return prep, params, order_NxTxB, optim.learning_rates(OPT, T)


@pytest.fixture(scope="module")
def inputs():
  return _inputs()


def _run(inputs, folder, **kw):
  prep, params, order_NxTxB, lr_T = inputs
  return simulate_to_folder(folder, params, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                            model_cfg=CFG, opt_cfg=OPT, plan=PLAN, chunk_size=CHUNK,
                            progress=False, **kw)


def _assert_same(a, b):
  # Float rounding only: processes with other device counts vmap other numbers of orders
  # per call (`default_chunk_size`), which may reorder a reduction's sums.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


def test_streamed_results_equal_simulate_many(inputs, tmp_path):
  prep, params, order_NxTxB, lr_T = inputs
  streamed = _run(inputs, tmp_path / "r")
  direct = simulate_many(params, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                         model_cfg=CFG, opt_cfg=OPT, plan=PLAN, chunk_size=CHUNK, progress=False)
  _assert_same(streamed, direct)
  assert sorted(os.listdir(tmp_path / "r")) == [f"chunk-00000{i}.npz" for i in range(3)] + [
      "manifest.json"]


def test_resume_recomputes_only_missing_chunks(inputs, tmp_path):
  first = _run(inputs, tmp_path / "r")
  os.remove(tmp_path / "r" / "chunk-000001.npz")
  kept = os.stat(tmp_path / "r" / "chunk-000000.npz").st_mtime_ns
  with pytest.raises(ResultsError, match="resume"):
    _run(inputs, tmp_path / "r")
  _assert_same(_run(inputs, tmp_path / "r", resume=True), first)
  assert os.stat(tmp_path / "r" / "chunk-000000.npz").st_mtime_ns == kept


def test_tampered_or_foreign_results_are_clear_errors(inputs, tmp_path):
  _run(inputs, tmp_path / "r")
  path = tmp_path / "r" / "chunk-000002.npz"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ResultsError, match="chunk-000002.npz.*unreadable"):
    load_results(tmp_path / "r", inputs[2])
  with pytest.raises(ResultsError, match="chunk-000000.npz.*other orders"):
    load_results(tmp_path / "r", inputs[2][::-1])
  prep, params, order_NxTxB, lr_T = inputs
  with pytest.raises(ResultsError, match="other inputs"):
    simulate_to_folder(tmp_path / "r", params, optim.Knobs.identity(), order_NxTxB, lr_T * 2,
                       prep.data, model_cfg=CFG, opt_cfg=OPT, plan=PLAN, chunk_size=CHUNK,
                       progress=False, resume=True)


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_store as t
    t._run(t._inputs({n}), {folder!r}, resume=True)
""")


def test_kill_9_then_resume_loses_duplicates_and_changes_nothing(tmp_path):
  n = 24
  inputs = _inputs(n)
  folder = str(tmp_path / "killed")
  code = _CHILD.format(tests=os.path.dirname(__file__), n=n, folder=folder)
  child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": ""})
  deadline = time.time() + 300
  while time.time() < deadline and child.poll() is None:
    if os.path.isdir(folder) and any(f.startswith("chunk-") for f in os.listdir(folder)):
      break
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  done = [f for f in os.listdir(folder) if f.startswith("chunk-")]
  assert 1 <= len(done) <= n // CHUNK
  resumed = _run(inputs, folder, resume=True)
  _assert_same(resumed, _run(inputs, tmp_path / "clean"))
  assert resumed.eval_loss_CxM.shape[0] == n


def test_results_do_not_depend_on_chunk_size(inputs):
  prep, params, order_NxTxB, lr_T = inputs
  kw = {"model_cfg": CFG, "opt_cfg": OPT, "plan": PLAN, "progress": False}
  small = simulate_many(params, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                        chunk_size=4, **kw)
  whole = simulate_many(params, optim.Knobs.identity(), order_NxTxB, lr_T, prep.data,
                        chunk_size=N, **kw)
  _assert_same(small, whole)


_SHARE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_store as t
    t._run(t._inputs(), {folder!r}, processes=t.ProcessShare({index}, 2, 600))
""")


_DISTRIBUTED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id={index})
    assert jax.process_count() == 2 and jax.process_index() == {index}
    import test_store as t
    t._run(t._inputs(), {folder!r})   # the share of the chunks comes from jax.distributed
    jax.distributed.shutdown()
""")


def test_a_real_jax_distributed_launch_splits_the_orders(inputs, tmp_path):
  # Two processes under jax.distributed.initialize with a local coordinator: each takes its
  # share of the chunks from jax.process_index() / process_count(), and the folder's result
  # equals one process's.
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  folder = str(tmp_path / "distributed")
  children = [subprocess.Popen([sys.executable, "-c", _DISTRIBUTED.format(
      tests=os.path.dirname(__file__), folder=folder, index=i, port=port)],
      env={**os.environ, "XLA_FLAGS": ""}) for i in (0, 1)]
  assert [c.wait(timeout=600) for c in children] == [0, 0]
  chunks = sorted(f for f in os.listdir(folder) if f.startswith("chunk-"))
  assert len(chunks) >= 2          # both processes' shares are there
  _assert_same(load_results(folder, inputs[2]), _run(inputs, tmp_path / "alone"))


def test_two_processes_share_the_chunks_of_one_folder(inputs, tmp_path):
  # Two processes (as two hosts under jax.distributed would be) simulate alternate chunks
  # into one folder; each returns the whole result, equal to one process doing it all.
  folder = str(tmp_path / "shared")
  children = [subprocess.Popen([sys.executable, "-c", _SHARE.format(
      tests=os.path.dirname(__file__), folder=folder, index=i)],
      env={**os.environ, "XLA_FLAGS": ""}) for i in (1, 0)]
  assert [c.wait(timeout=600) for c in children] == [0, 0]
  _assert_same(load_results(folder, inputs[2]), _run(inputs, tmp_path / "alone"))
  with pytest.raises(ValueError, match="ProcessShare index 2"):
    _run(inputs, tmp_path / "bad", processes=ProcessShare(2, 2))
