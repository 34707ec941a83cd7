"""Low-rank mode: only the adapters train, the update has their rank, the header selects it."""

import dataclasses

import jax
import numpy as np
import pytest

from calibrate.io.runlog import RunHeader
from surrogate import adapters
from surrogate import model as model_lib
from surrogate import optim, orders
from surrogate.datasets import python_docs
from surrogate.prepare import prepare
from surrogate.simulate import SimPlan, simulate, train

# Distinct sizes: D=16, M=32, K=2, rank 3, T=8 steps of B=3.
CFG = model_lib.ModelConfig(vocab_size=300, length=12, width=16, depth=2, heads=2, mlp_ratio=2)
SPEC = adapters.LowRank(rank=3, alpha=6.0, targets=("qkv", "out"))
OPT = optim.OptimizerConfig(lr=1e-2, adapter=SPEC)


@pytest.fixture(scope="module")
def setup():
  frags = python_docs(("try", "import", "async"), max_train=9, max_probe=4)
  prep = prepare(frags, CFG, key=jax.random.key(0), eval_train=2, diag_probes=2)
  params = model_lib.init_params(jax.random.key(1), CFG)
  order = orders.shuffled(frags.train_pools(), key=jax.random.key(2), steps=8, batch_size=3)
  return prep, params, order


def test_adapters_start_as_the_base_and_have_their_shapes(setup):
  _, params, _ = setup
  ad = adapters.init(jax.random.key(3), params, SPEC)
  assert ad["qkv_A"].shape == (2, 16, 3) and ad["qkv_B"].shape == (2, 3, 48)
  assert ad["out_A"].shape == (2, 32, 3) and ad["out_B"].shape == (2, 3, 16)
  merged = adapters.merge(params, ad, SPEC)
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_only_the_targets_move_and_by_a_low_rank_update(setup):
  prep, params, order = setup
  lr = optim.learning_rates(OPT, len(order))
  after, loss_T, diverged = train(params, optim.Knobs.identity(), order, lr,
                                  prep.data.tokens_ExL1, prep.data.mask_ExL, model_cfg=CFG,
                                  opt_cfg=OPT)
  assert int(diverged) == -1 and np.isfinite(np.asarray(loss_T)).all()
  for key in ("qkv_KxDx3D", "out_KxMxD"):
    delta = np.asarray(after["blocks"][key] - params["blocks"][key])
    assert np.abs(delta).max() > 1e-4
    assert all(np.linalg.matrix_rank(d, tol=1e-6) <= 3 for d in delta)
  for key in ("fc_KxDxM", "proj_KxDxD", "ln1_scale_KxD", "qkv_bias_Kx3D"):
    np.testing.assert_array_equal(after["blocks"][key], params["blocks"][key])
  np.testing.assert_array_equal(after["embed_VxD"], params["embed_VxD"])
  # A full fine-tune of the same order moves everything.
  full, _, _ = train(params, optim.Knobs.identity(), order, lr, prep.data.tokens_ExL1,
                     prep.data.mask_ExL, model_cfg=CFG,
                     opt_cfg=dataclasses.replace(OPT, adapter=None))
  assert np.abs(np.asarray(full["embed_VxD"] - params["embed_VxD"])).max() > 1e-4


def test_simulate_in_low_rank_mode_learns(setup):
  prep, params, order = setup
  traj = simulate(params, optim.Knobs.identity(), order, optim.learning_rates(OPT, 8),
                  prep.data, model_cfg=CFG, opt_cfg=OPT, plan=SimPlan(eval_every=4))
  ev = np.asarray(traj.eval_loss_CxM)
  assert ev.shape[0] == 3 and np.all(np.isfinite(ev)) and ev[-1].mean() < ev[0].mean()


def test_the_header_selects_the_mode():
  header = RunHeader(run_id="r", dataset_sha256="0" * 64, model="m", batch_size=4,
                     optimizer={"name": "adamw", "lr": 2e-3},
                     extra={"adapter": {"kind": "lora", "r": 8, "alpha": 16,
                                        "targets": ["c_attn", "c_fc"]}})
  cfg = optim.OptimizerConfig.of_run(header)
  assert cfg.adapter == adapters.LowRank(rank=8, alpha=16.0, targets=("fc", "qkv"))
  assert optim.OptimizerConfig.from_dict(cfg.to_dict()) == cfg  # saved simulators keep it
  llama = adapters.LowRank.from_header({"r": 4, "targets": ["q_proj", "v_proj", "down_proj"]})
  assert llama.targets == ("out", "qkv") and llama.alpha == 4.0
  assert optim.OptimizerConfig.of_run(dataclasses.replace(header, extra={})).adapter is None
  with pytest.raises(ValueError, match="LoRA"):
    adapters.LowRank.from_header({"kind": "ia3", "r": 4})
