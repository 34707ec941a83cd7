"""Test settings: strict shapes (no implicit rank promotion), float32, CPU."""

import os

# Four host devices, so the sharded path is exercised; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
