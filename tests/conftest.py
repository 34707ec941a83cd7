"""Test settings: strict shapes (no implicit rank promotion), float32, CPU."""

import os

# Four host devices, so the sharded path is exercised; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world():
  """Runs of a known truth (see tests/self_made.py)."""
  from self_made import make_world
  return make_world()


@pytest.fixture(scope="session")
def sim(world):
  """A simulator fitted on the first three runs of `world`."""
  from self_made import make_sim
  return make_sim(world)
