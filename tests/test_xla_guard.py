"""The guard against jaxlib 0.10's CPU fusion miscompilation works: with
combinators imported first, a fused reduction times a broadcast array is
right past 2^15 elements (78 of 11000 rows were wrong without it)."""

import os
import subprocess
import sys

import jax
import pytest

SCRIPT = """
import combinators
import jax, jax.numpy as jnp, numpy as np
c = jnp.array([1.0, -2.0, 0.5])
f = jax.jit(lambda x, g: jnp.sum(c * x**2, axis=1)[:, None] * g)
x = jax.random.normal(jax.random.key(0), (11000, 3))
g = jax.random.normal(jax.random.key(1), (11000, 3))
ref = np.sum(np.asarray(c) * np.asarray(x) ** 2, 1)[:, None] * np.asarray(g)
print(int((np.abs(np.asarray(f(x, g)) - ref).max(1) > 1e-3).sum()))
"""


@pytest.mark.skipif(
    not jax.__version__.startswith("0.10."), reason="only jaxlib 0.10 is affected"
)
def test_fused_reduction_is_right_when_combinators_is_imported_first():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", done.stdout


def test_flag_is_set_in_this_process():
    if jax.__version__.startswith("0.10."):
        assert "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
