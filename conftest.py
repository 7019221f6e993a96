"""Test setup for tests/ and the packages' doctests: 8 host CPU devices, so sharding tests
run without an accelerator.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
