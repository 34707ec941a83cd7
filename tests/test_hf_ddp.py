"""A real two-process run (torch's gloo backend on CPU): one log, equal to the order, equal to
the same run in one process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from calibrate.io.runlog import order_from_runlog, read_runlog

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# Exact on transformers 5; 4.x rounds logged losses to 4 decimals and normalises the DDP
# loss slightly differently (up to 1e-4 in eval losses after four steps, 4.46.3).
LOSS_TOL, EVAL_TOL = ((1e-5, 1e-5) if int(transformers.__version__.split(".")[0]) >= 5
                      else (5e-4, 5e-4))

WORKER = os.path.join(os.path.dirname(__file__), "hf_ddp_worker.py")


def _run(cmd, out):
  env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
  done = subprocess.run(cmd + [WORKER, str(out)], capture_output=True, text=True, env=env,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_record_one_log_equal_to_one_process(tmp_path):
  from surrogate.datasets import python_docs
  frags = python_docs(("try", "import", "async"), max_train=8, max_probe=2)
  two, one = tmp_path / "two", tmp_path / "one"
  _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(29500 + os.getpid() % 1000)], two)
  _run([sys.executable], one)
  # Process 1 wrote nothing: the one log is process 0's.
  assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["run.jsonl"]
  a, b = read_runlog(two / "run.jsonl", frags), read_runlog(one / "run.jsonl", frags)
  assert (a.header.extra["world_size"], a.header.extra["grad_accum"]) == (2, 2)
  assert a.header.extra["micro_batch_size"] == 2 and b.header.extra["micro_batch_size"] == 4
  np.testing.assert_array_equal(order_from_runlog(a, frags), order_from_runlog(b, frags))
  # Each step's batch of 8 is split 2 micro-batches x 2 processes, yet the run is the same.
  np.testing.assert_allclose([s.loss for s in a.steps], [s.loss for s in b.steps],
                             atol=LOSS_TOL)
  assert a.eval_steps == b.eval_steps == (0, 2, 4)
  for ea, eb in zip(a.evals, b.evals):
    assert set(ea.losses) == set(eb.losses)  # every process's share was gathered
    np.testing.assert_allclose([ea.losses[k] for k in eb.losses], list(eb.losses.values()),
                               atol=EVAL_TOL)
