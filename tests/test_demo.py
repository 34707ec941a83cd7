"""The demo's bundled simulator: made from the bundled real runs it names, with an analytic
tier that was checked, and it answers through that tier as the demo does."""

import dataclasses
import os

import numpy as np
import pytest

from calibrate.cli import demo
from calibrate.fitting.calibration import predict, resolve_tier, schedule
from calibrate.fitting.saved import load
from calibrate.io.runlog import order_from_runlog, read_runlog
from calibrate.io.teacher import tokenizer_sha256
from calibrate.reference import causal_base
from surrogate.fragments import read_fragments
from surrogate.orders import order_sha256

DATA = demo._data_dir()


@pytest.fixture(scope="module")
def bundled():
  return load(demo.bundled_simulator())


def test_the_bundled_simulator_was_calibrated_on_the_demo_s_runs(bundled):
  frags = read_fragments(os.path.join(DATA, "fragments.jsonl"))
  assert bundled.fragments.names == frags.names
  assert bundled.fit_info.calibration_runs == demo.CALIBRATION
  runs = [read_runlog(os.path.join(DATA, "runs", f"{n}.jsonl"), frags) for n in demo.CALIBRATION]
  assert bundled.fit_info.calibration_orders_sha256 == tuple(
      order_sha256(order_from_runlog(r, frags)) for r in runs)
  # Distilled from the bundled real base model (the demo's default since round 4's rule).
  with open(os.path.join(causal_base("lm"), "tokenizer.json"), encoding="utf-8") as f:
    base_sha = tokenizer_sha256(f.read())
  d = bundled.fit_info.distillation
  assert d is not None and d.tokenizer_sha256 == base_sha and d.kl_after < d.kl_before
  tier = bundled.analytic
  assert tier is not None and tier.fidelity is not None
  assert tier.fidelity.orders == demo.BUNDLED_CHECK_ORDERS and tier.form == "latent"


def test_the_bundled_tier_predicts_held_out_runs_near_the_transformer(bundled):
  # Through the tier (forced) and the transformer, one held-out run, every seed: the two
  # tiers' predicted final probe losses differ by far less than the run's own drop.
  frags = bundled.fragments
  run = read_runlog(os.path.join(DATA, "runs", f"{demo.HELD_OUT[1]}.jsonl"), frags)
  order = np.stack([order_from_runlog(run, frags)])
  assert resolve_tier(bundled, "analytic")[0] is bundled.analytic
  ana, _ = predict(bundled, order, schedule(bundled), bundled.steps_C, tier="analytic")
  sur, _ = predict(bundled, order, schedule(bundled), bundled.steps_C, tier="transformer")
  probe = ana.is_probe_M
  a, s = ana.members_NxKxCxM.mean(1)[0], sur.members_NxKxCxM.mean(1)[0]
  drop = np.nanmean(s[0, probe] - s[-1, probe])
  assert drop > 0 and abs(np.nanmean(a[-1, probe] - s[-1, probe])) < 0.2 * drop


def test_the_demo_s_small_check_overturns_the_stored_one_only_when_it_refutes_it(bundled):
  stored = bundled.analytic
  fid = stored.fidelity
  assert fid.trusted  # the bundled tier passed its check of 64 orders

  def check(of, trusted, interval):
    return dataclasses.replace(of, fidelity=dataclasses.replace(
        fid, orders=8, trusted=trusted, ratio_interval=interval))

  wide = ((0.89, 0.99), (0.79, 1.03))        # failed, but its intervals reach the bar
  assert demo._decide(stored, check(stored, False, wide)) is stored
  below = ((0.80, 0.93), (0.85, 0.99))       # one ratio's whole interval under 0.95
  assert not demo._decide(stored, check(stored, False, below)).fidelity.trusted
  untrusted = dataclasses.replace(stored, fidelity=dataclasses.replace(fid, trusted=False))
  assert demo._decide(untrusted, check(untrusted, True, wide)) is untrusted
