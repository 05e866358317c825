"""Bad input fails at trace time with an error naming the combinator and site."""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import loss

N = 8


def target(n=N):
    with numpyro.plate("particles", n):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
    return (z,)


def proposal(n=N):
    with numpyro.plate("particles", n):
        z = numpyro.sample("z", dist.Normal(0.3, 1.2))
    return (z,)


def run(program, *args):
    return coix.traced_evaluate(program, seed=jax.random.key(0))(*args)


def test_no_key_raises_with_instructions():
    program = coix.propose(target, proposal)
    with pytest.raises(
        ValueError, match=r"site 'z' needs a PRNG key.*seed=jax.random.key"
    ):
        coix.traced_evaluate(program)()


def test_resample_without_key_raises():
    program = coix.resample(coix.propose(target, proposal))
    with pytest.raises(ValueError, match="PRNG key"):
        coix.traced_evaluate(program)()


def test_prng_key_outside_seed_raises():
    with pytest.raises(ValueError, match="prng_key: no PRNG key"):
        coix.prng_key()


def test_key_as_first_argument_is_used():
    def keyed_target(key):
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0), rng_key=key)
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    def keyed_proposal(key):
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0), rng_key=key)
        return (z,)

    program = coix.propose(keyed_target, keyed_proposal)
    _, trace_a, _ = coix.traced_evaluate(program)(jax.random.key(1))
    _, trace_b, _ = coix.traced_evaluate(program)(jax.random.key(1))
    _, trace_c, _ = coix.traced_evaluate(program)(jax.random.key(2))
    assert jnp.array_equal(trace_a["z"].value, trace_b["z"].value)
    assert not jnp.array_equal(trace_a["z"].value, trace_c["z"].value)


def test_duplicate_site_names_raise():
    def twice():
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        return ()

    with pytest.raises(ValueError, match="traced_evaluate: duplicate site name 'z'"):
        run(twice)


def test_compose_without_suffix_rejects_shared_names():
    program = coix.compose(lambda z: proposal(), proposal, suffix=False)
    with pytest.raises(ValueError, match="duplicate site name 'z'"):
        run(program)


def test_proposal_sampling_an_observed_site_raises():
    def bad_proposal():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(0.0, 1.0))
        return (z,)

    with pytest.raises(
        ValueError, match=r"propose: .*latent site 'y' that the target observes"
    ):
        run(coix.propose(target, bad_proposal))


def test_particle_sizes_that_disagree_raise():
    program = coix.propose(lambda: target(N), lambda: proposal(2 * N))
    with pytest.raises(ValueError, match=r"propose: site 'z'.*\(16,\).*\(8,\)"):
        run(program)


def test_plate_sizes_that_disagree_raise_even_when_broadcastable():
    def one_particle_target():
        with numpyro.plate("particles", 1):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    with pytest.raises(ValueError, match=r"propose: site 'z'.*'particles' \(size 1"):
        run(coix.propose(one_particle_target, proposal))


def test_latent_only_in_proposal_raises():
    def proposal_with_extra():
        with numpyro.plate("particles", N):
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            z = numpyro.sample("z", dist.Normal(u, 1.0))
        return (z,)

    with pytest.raises(
        ValueError, match=r"latent site 'u' that the target does not score"
    ):
        run(coix.propose(target, proposal_with_extra))


def test_stochastic_kernel_without_reverse_kernel_raises():
    def kernel(z):
        with numpyro.plate("particles", N):
            return (numpyro.sample("z", dist.Normal(z, 0.1)),)

    program = coix.propose(target, coix.compose(kernel, coix.propose(target, proposal)))
    with pytest.raises(
        ValueError, match=r"re-samples site 'z' with a stochastic kernel"
    ):
        run(program)


def test_deterministic_kernel_needs_no_reverse_kernel():
    def flow(z):
        with numpyro.plate("particles", N):
            return (numpyro.sample("z", dist.Delta(2.0 * z, jnp.log(2.0))),)

    program = coix.propose(target, coix.compose(flow, coix.propose(target, proposal)))
    _, _, metrics = run(program)
    assert jnp.all(jnp.isfinite(metrics.log_weight))


def test_discrete_latent_under_pathwise_loss_raises():
    def discrete_target():
        with numpyro.plate("particles", N):
            k = numpyro.sample("k", dist.Bernoulli(0.3))
            numpyro.sample("y", dist.Normal(k, 0.5), obs=1.0)
        return (k,)

    def discrete_proposal():
        with numpyro.plate("particles", N):
            return (numpyro.sample("k", dist.Bernoulli(0.5)),)

    for pathwise in (loss.elbo_loss, loss.iwae_loss):
        with pytest.raises(ValueError, match=r"site 'k' is not reparameterisable"):
            run(coix.propose(discrete_target, discrete_proposal, loss_fn=pathwise))
    # A score-function loss is fine.
    _, _, metrics = run(
        coix.propose(
            discrete_target, coix.detach(discrete_proposal), loss_fn=loss.rws_loss
        )
    )
    assert jnp.isfinite(metrics.loss)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: coix.propose(target, 3), "q"),
        (lambda: coix.propose("p", proposal), "p"),
        (lambda: coix.compose(None, proposal), "q2"),
        (lambda: coix.extend(target, 1.0), "f"),
        (lambda: coix.resample([1, 2]), "q"),
        (lambda: coix.fori_loop(0, 2, lambda i, q: q, None), "init_program"),
    ],
)
def test_non_callable_programs_raise(build, argument):
    with pytest.raises(TypeError, match=rf"argument '{argument}' must be a program"):
        build()


def test_compose_requires_tuple_outputs():
    def returns_array():
        return numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="compose: q1 must return a tuple"):
        run(coix.compose(lambda z: (), returns_array))


def test_weighted_target_raises():
    weighted = coix.propose(target, proposal)
    with pytest.raises(
        ValueError, match="propose: site 'z' of the target is a replayed"
    ):
        run(coix.propose(weighted, proposal))


def test_same_weighted_program_twice_without_suffix_raises():
    # Two weighted programs multiply their weights (nested importance
    # sampling), but running the same one twice repeats its site names.
    weighted = coix.propose(target, proposal)

    def both():
        weighted()
        return weighted()

    with pytest.raises(
        ValueError, match="duplicate site name 'y'|duplicate site name 'z'"
    ):
        run(both)


def test_set_backend_is_a_checked_no_op():
    coix.set_backend("coix.numpyro")
    coix.set_backend("numpyro")
    with pytest.raises(ValueError, match="only the numpyro backend"):
        coix.set_backend("coix.oryx")


def test_resample_rejects_bad_num_samples():
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        coix.resample(proposal, num_samples=0)
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        run(coix.resample(coix.propose(target, proposal), method="bogus"))


@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_weights_are_reported_not_hidden(jit):
    def nan_target():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
            numpyro.factor("poison", jnp.where(jnp.arange(N) == 3, jnp.nan, 0.0))
        return (z,)

    program = coix.resample(coix.propose(nan_target, proposal))

    def evaluate(key):
        return coix.traced_evaluate(program, seed=key)()

    fn = jax.jit(evaluate) if jit else evaluate
    out, trace, metrics = fn(jax.random.key(0))
    assert jnp.isnan(metrics.log_Z)
    assert jnp.isnan(metrics.ess)
    # Without valid weights there is no resampling: particles stay in place
    # instead of all being copied from index 0.
    assert len(jnp.unique(trace["z"].value)) == N


def test_fori_loop_body_that_changes_the_trace_raises():
    def body(i, q):
        def kernel(z):
            with numpyro.plate("particles", N):
                return (numpyro.sample("w", dist.Normal(z, 1.0)),)

        return coix.compose(kernel, q)

    program = coix.fori_loop(0, 2, body, coix.propose(target, proposal))
    with pytest.raises(
        ValueError, match="fori_loop: the body's program changes the structure"
    ):
        run(program)


def test_plate_around_a_combinator_raises():
    def unplated_target():
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    def unplated_proposal():
        return (numpyro.sample("z", dist.Normal(0.0, 1.0)),)

    program = numpyro.plate("particles", N)(
        coix.propose(unplated_target, unplated_proposal)
    )
    with pytest.raises(
        ValueError, match=r"plate 'particles' wraps the output of a combinator"
    ):
        run(program)


def test_plate_mismatch_in_a_plain_program_names_the_caller_and_both_sites():
    def program():
        with numpyro.plate("particles", 3, dim=-1):
            numpyro.sample("x", dist.Normal(0.0, 1.0))
        with numpyro.plate("particles", 4, dim=-1):
            numpyro.sample("y", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"traced_evaluate.*site 'x'.*site 'y'"):
        coix.traced_evaluate(program, seed=0)()
    with pytest.raises(ValueError, match=r"^resample.*site 'x'.*site 'y'"):
        coix.traced_evaluate(coix.resample(program), seed=0)()
