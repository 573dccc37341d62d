"""Shared test set-up: 8 virtual CPU devices, so sharding code paths run on one machine.

The flag must be set before JAX is imported anywhere, which is why it lives here.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
