"""Checked mode: non-finite densities, weights and losses become errors that
name the combinator and the site, inside jit, grad and compiled loops."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import algo, loss

N = 8


def target(scale):
    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, scale), obs=0.5)
        return (z,)

    return program


def proposal(scale):
    def program():
        with numpyro.plate("particles", N):
            return (numpyro.sample("z", dist.Normal(0.0, scale)),)

    return program


def log_z_and_loss(target_scale, proposal_scale, key):
    program = coix.propose(
        target(target_scale), proposal(proposal_scale), loss_fn=loss.elbo_loss
    )
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return metrics.log_Z, metrics.loss


def test_checked_call_equals_unchecked_call_on_healthy_programs():
    key = jax.random.key(0)
    plain = jax.jit(log_z_and_loss)(1.0, 1.5, key)
    with_checks = coix.checked(log_z_and_loss)(1.0, 1.5, key)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_checks))


def test_nan_target_density_names_propose_and_the_site():
    key = jax.random.key(0)
    # A negative scale makes the observation's log density NaN: unchecked, the
    # NaN flows silently into log Z; checked, the error names site 'y'.
    assert np.isnan(jax.jit(log_z_and_loss)(-1.0, 1.5, key)[0])
    with pytest.raises(Exception, match=r"propose: site 'y' of the target has a NaN"):
        coix.checked(log_z_and_loss)(-1.0, 1.5, key)


def test_zero_proposal_density_is_an_infinite_weight_error():
    def infinite_weight(key):
        def bad_proposal():
            with numpyro.plate("particles", N):
                # A draw its own proposal gives zero density: weight +inf.
                numpyro.sample(
                    "z",
                    dist.Delta(jnp.full((N,), 3.0), -jnp.inf, validate_args=False),
                )
            return ()

        program = coix.propose(target(1.0), bad_proposal)
        return coix.traced_evaluate(program, seed=key)()[2].log_Z

    assert jax.jit(infinite_weight)(jax.random.key(1)) == jnp.inf
    with pytest.raises(
        Exception, match=r"propose: site 'z' of the proposal has log density -inf"
    ):
        coix.checked(infinite_weight)(jax.random.key(1))


def test_checks_survive_grad_and_name_the_loss():
    def loss_of(scale, key):
        return log_z_and_loss(1.0, scale, key)[1]

    grad = coix.checked(jax.grad(loss_of))
    assert np.isfinite(grad(1.5, jax.random.key(2)))
    with pytest.raises(Exception, match=r"propose: site 'z' of the proposal has a NaN"):
        grad(-1.5, jax.random.key(2))


def test_checks_inside_a_compiled_smc_loop_name_the_site():
    # A filter (one lax.scan) whose observation density turns NaN at step 3.
    def targets(t):
        def program(x_prev):
            with numpyro.plate("particles", N):
                x = numpyro.sample("x", dist.Normal(x_prev, 1.0))
                scale = jnp.where(t == 3, -1.0, 1.0)
                numpyro.sample("y", dist.Normal(x, scale), obs=0.0)
            return (x,)

        return program

    def proposals(t):
        del t

        def program(x_prev):
            with numpyro.plate("particles", N):
                return (numpyro.sample("x", dist.Normal(x_prev, 1.0)),)

        return program

    def log_z(key, num_targets):
        program = algo.smc(targets, proposals, num_targets=num_targets)
        return coix.traced_evaluate(program, seed=key)(jnp.zeros(N))[2].log_Z

    three_steps = coix.checked(lambda key: log_z(key, 3))
    assert np.isfinite(three_steps(jax.random.key(0)))
    six_steps = coix.checked(lambda key: log_z(key, 6))
    with pytest.raises(Exception, match=r"propose: site 'y' of the target has a NaN"):
        six_steps(jax.random.key(0))


def test_all_minus_infinity_column_is_reported_by_resample():
    def program(key):
        def nowhere():
            with numpyro.plate("particles", N):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
                # Every particle lies outside the target's support.
                numpyro.factor("outside", jnp.full((N,), -jnp.inf))
            return (z,)

        q = coix.resample(coix.propose(nowhere, proposal(1.0)))
        return coix.traced_evaluate(q, seed=key)()[2].log_Z

    assert jax.jit(program)(jax.random.key(0)) == -jnp.inf
    with pytest.raises(
        Exception, match=r"propose: every particle of a column has log weight -inf"
    ):
        coix.checked(program)(jax.random.key(0))
