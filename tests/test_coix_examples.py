# SPDX-License-Identifier: Apache-2.0
"""Smoke runs of the Coix-style example workflows (programs/coix_examples).

Each example is written as Coix's examples are (undeclared batch dims,
particle plates opened by hand, Coix's ``util.train`` call shape). These
runs check that they train with weights of the expected layout; the side
by side comparison with Coix is ``benchmarks/coix_parity.py``.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import optax

import combinators as coix
from programs.coix_examples import anneal, dmm, gmm


def train_two_steps(loss_fn, params, data=None):
    """Two jit-compiled training steps; the final parameters and metrics."""
    return coix.util.train(loss_fn, params, optax.adam(1e-3), 2, data, progress=False)


def assert_trained(params, metrics, log_weight_shape):
    assert metrics["log_weight"].shape == log_weight_shape
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["log_Z"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_gmm_weights_each_data_set_separately_and_trains():
    params, metrics = train_two_steps(
        partial(gmm.loss_fn, num_sweeps=1, num_particles=3),
        gmm.init_params(12),
        gmm.batches(2, num_points=12),
    )
    # Particles x data sets x 1: the data plate is summed (the cluster
    # parameters couple the points), the undeclared batch dim is kept.
    assert_trained(params, metrics, (3, 2, 1))


def test_dmm_weights_each_data_set_separately():
    batch = next(dmm.batches(2, num_points=12))
    loss, metrics = jax.jit(
        partial(dmm.loss_fn, num_sweeps=1, num_particles=3),
        compiler_options={"xla_backend_optimization_level": 0},
    )(dmm.init_params(12), jax.random.PRNGKey(0), batch)
    assert metrics["log_weight"].shape == (3, 2, 1)
    assert np.isfinite(loss) and np.isfinite(metrics["log_Z"])


def test_anneal_trains_with_nvi_rkl():
    params, metrics = train_two_steps(
        partial(anneal.loss_fn, num_particles=4), anneal.init_params()
    )
    assert_trained(params, metrics, (4,))
