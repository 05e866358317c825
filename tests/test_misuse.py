"""A gallery of plausible mistakes: each raises at trace time, by name.

One row per mistake: the call, the exception type and the words the message
must contain (the combinator, and the site or plate where there is one).
Nothing here may return a number silently.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import loss as L

KEY = jax.random.key(0)


def evaluate(program, *args, **kwargs):
    return coix.traced_evaluate(program, seed=KEY)(*args, **kwargs)


def normal_target(n, *, particle_dim=-1, data=None, data_dim=-2):
    def p():
        with numpyro.plate("particles", n, dim=particle_dim):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            if data is None:
                numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
            else:
                with numpyro.plate("data", data.shape[0], dim=data_dim):
                    numpyro.sample("y", dist.Normal(z, 1.0), obs=data)
        return (z,)

    return p


def normal_proposal(n, *, particle_dim=-1):
    def q():
        with numpyro.plate("particles", n, dim=particle_dim):
            return (numpyro.sample("z", dist.Normal(0.0, 1.0)),)

    return q


def observed(distribution, value, n=3):
    def p():
        with numpyro.plate("particles", n):
            numpyro.sample("x", distribution, obs=value)

    return p


# --- 1. particle layout ------------------------------------------------------


def particles_right_of_data():
    data = jnp.arange(3.0)[:, None]  # a data plate at dim -2
    p = normal_target(4, particle_dim=-1, data=data, data_dim=-2)
    return evaluate(coix.propose(p, normal_proposal(4)))


def particle_dims_disagree():
    p = normal_target(4, particle_dim=-1)

    def q():
        with numpyro.plate("particles", 4, dim=-2):
            return (numpyro.sample("z", dist.Normal(jnp.zeros((4, 1)), 1.0)),)

    return evaluate(coix.propose(p, q))


def compose_weighted_8_and_4():
    first = coix.propose(normal_target(8), normal_proposal(8))

    def second_target():
        with numpyro.plate("particles", 4):
            numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("u", dist.Normal(0.0, 1.0), obs=0.3)

    def second_proposal():
        with numpyro.plate("particles", 4):
            numpyro.sample("w", dist.Normal(0.0, 1.0))

    second = coix.propose(second_target, second_proposal)
    return evaluate(coix.compose(lambda *_: second(), first))


def resample_4_then_kernel_8():
    q = coix.resample(coix.propose(normal_target(8), normal_proposal(8)), 4)

    def kernel(z):
        with numpyro.plate("particles", 8):
            return (numpyro.sample("v", dist.Normal(0.0, 1.0)),)

    return evaluate(coix.compose(kernel, q))


# --- 2. log-density shapes -------------------------------------------------


def observation_n_by_1():
    def p():
        with numpyro.plate("data", 3):
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=jnp.ones((3, 1)))

    return evaluate(p)


def observation_extra_leading_dim():
    def p():
        with numpyro.plate("data", 3):
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=jnp.ones((2, 3)))

    return evaluate(p)


def event_in_target_plate_in_proposal():
    def p():
        with numpyro.plate("particles", 4, dim=-2):
            numpyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 3]).to_event(1))

    def q():
        with numpyro.plate("particles", 4, dim=-2), numpyro.plate("d", 3, dim=-1):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    return evaluate(coix.propose(p, q))


def integer_draw_continuous_target():
    def p():
        with numpyro.plate("particles", 4):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    def q():
        with numpyro.plate("particles", 4):
            numpyro.sample("z", dist.Poisson(2.0))

    return evaluate(coix.propose(p, q))


# --- 3. observed data --------------------------------------------------------


def bernoulli_two():
    return evaluate(observed(dist.Bernoulli(0.5), jnp.array([1.0, 2.0, 0.0])))


def bernoulli_half():
    return evaluate(observed(dist.Bernoulli(0.5), jnp.array([1.0, 0.5, 0.0])))


def half_normal_negative():
    return evaluate(observed(dist.HalfNormal(1.0), jnp.array([1.0, -1.0, 0.5])))


def categorical_out_of_range():
    probs = jnp.ones(3) / 3
    return evaluate(observed(dist.Categorical(probs), jnp.array([0, 3, 1])))


def nan_in_data():
    return evaluate(observed(dist.Normal(0.0, 1.0), jnp.array([0.1, jnp.nan, 0.2])))


def inf_in_data():
    return evaluate(observed(dist.Normal(0.0, 1.0), jnp.array([0.1, jnp.inf, 0.2])))


# --- 5. checks follow the loss ----------------------------------------------


def bernoulli_pair():
    def p():
        with numpyro.plate("particles", 4):
            z = numpyro.sample("z", dist.Bernoulli(0.3))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=1.0)

    def q():
        with numpyro.plate("particles", 4):
            numpyro.sample("z", dist.Bernoulli(0.5))

    return p, q


def pathwise_loss_in_partial():
    p, q = bernoulli_pair()
    loss_fn = functools.partial(L.elbo_loss, aggregate=True)
    return evaluate(coix.propose(p, q, loss_fn=loss_fn))


def pathwise_loss_in_lambda():
    p, q = bernoulli_pair()
    return evaluate(coix.propose(p, q, loss_fn=lambda *a: L.iwae_loss(*a)))


def vector_loss():
    p, q = normal_target(4), normal_proposal(4)
    return evaluate(
        coix.propose(p, q, loss_fn=lambda *a: L.elbo_loss(*a, aggregate=False))
    )


# --- 6. loops and memory ------------------------------------------------------


def fori_loop_backwards():
    return coix.fori_loop(3, 1, lambda i, q: q, normal_proposal(4))


def scan_backwards():
    return coix.scan(5, 2, lambda i, q: q, normal_proposal(4))


def memory_unknown_site():
    memory = {"w": jnp.zeros((2,))}
    program = coix.memoize(normal_target(6), normal_proposal(4), memory=memory)
    return evaluate(program)


def memory_size_zero():
    return coix.memoize(normal_target(6), normal_proposal(4), memory_size=0)


def memory_size_negative():
    return coix.memoize(normal_target(6), normal_proposal(4), memory_size=-2)


def memory_wrong_shape():
    memory = {"z": jnp.zeros((2, 5))}
    program = coix.memoize(normal_target(6), normal_proposal(4), memory=memory)
    return evaluate(program)


def unknown_latent_name():
    return coix.traced_evaluate(
        normal_proposal(4), latents={"zz": jnp.zeros(4)}, seed=KEY
    )()


# --- 7. the library's boundary ------------------------------------------------


def zero_particles():
    return evaluate(coix.propose(normal_target(0), normal_proposal(0)))


def float_seed():
    return coix.traced_evaluate(normal_proposal(4), seed=1.5)()


def uint32_key_of_three():
    return coix.traced_evaluate(normal_proposal(4), seed=jnp.zeros(3, jnp.uint32))()


def batch_of_typed_keys():
    return coix.traced_evaluate(normal_proposal(4), seed=jax.random.split(KEY, 3))()


def int32_key():
    return coix.traced_evaluate(normal_proposal(4), seed=jnp.zeros(2, jnp.int32))()


def jitted_program():
    return coix.propose(normal_target(4), jax.jit(normal_proposal(4)))


def missing_argument():
    def q(x):
        with numpyro.plate("particles", 4):
            numpyro.sample("z", dist.Normal(x, 1.0))

    return evaluate(q)


def two_plates_one_dim():
    def q():
        with numpyro.plate("particles", 4, dim=-1), numpyro.plate("b", 4, dim=-1):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    return evaluate(q)


def observation_as_list():
    return evaluate(observed(dist.Normal(0.0, 1.0), [0.1, 0.2, 0.3]))


def observation_as_string():
    return evaluate(observed(dist.Normal(0.0, 1.0), "0.1"))


def plate_too_small():
    def q():
        with numpyro.plate("particles", 3):
            numpyro.sample("z", dist.Normal(jnp.zeros(5), 1.0))

    return evaluate(q)


def resample_bool():
    return coix.resample(normal_proposal(4), num_samples=True)


GALLERY = [
    # (id, call, exception, words the message must contain)
    ("particles right of data", particles_right_of_data, ValueError, ["propose", "'particles'", "'data'"]),
    ("particle dims disagree", particle_dims_disagree, ValueError, ["propose", "'particles'", "dim"]),
    ("compose 8 and 4 particles", compose_weighted_8_and_4, ValueError, ["particles"]),
    ("resample 4 then kernel 8", resample_4_then_kernel_8, ValueError, ["'particles'", "size 4", "size 8"]),
    ("observation (N, 1)", observation_n_by_1, ValueError, ["traced_evaluate", "'y'", "(3, 3)"]),
    ("observation extra dim", observation_extra_leading_dim, ValueError, ["traced_evaluate", "'y'", "(2, 3)"]),
    ("event vs plate", event_in_target_plate_in_proposal, ValueError, ["propose", "'z'"]),
    ("integer draw, continuous target", integer_draw_continuous_target, ValueError, ["propose", "'z'", "integer"]),
    ("Bernoulli 2", bernoulli_two, ValueError, ["traced_evaluate", "'x'", "support"]),
    ("Bernoulli 0.5", bernoulli_half, ValueError, ["traced_evaluate", "'x'", "support"]),
    ("HalfNormal -1", half_normal_negative, ValueError, ["traced_evaluate", "'x'", "support"]),
    ("Categorical 3 of 3", categorical_out_of_range, ValueError, ["traced_evaluate", "'x'", "support"]),
    ("NaN data", nan_in_data, ValueError, ["traced_evaluate", "'x'", "NaN"]),
    ("inf data", inf_in_data, ValueError, ["traced_evaluate", "'x'", "infinite"]),
    ("pathwise loss in partial", pathwise_loss_in_partial, ValueError, ["propose", "'z'", "elbo_loss"]),
    ("pathwise loss in lambda", pathwise_loss_in_lambda, ValueError, ["propose", "'z'", "iwae_loss"]),
    ("vector loss", vector_loss, ValueError, ["propose", "scalar", "(4,)"]),
    ("fori_loop lower > upper", fori_loop_backwards, ValueError, ["fori_loop", "lower=3", "upper=1"]),
    ("scan lower > upper", scan_backwards, ValueError, ["scan", "lower=5"]),
    ("memory of unknown site", memory_unknown_site, ValueError, ["memoize", "'w'"]),
    ("memory_size 0", memory_size_zero, ValueError, ["memoize", "memory_size"]),
    ("memory_size -2", memory_size_negative, ValueError, ["memoize", "memory_size"]),
    ("memory of wrong shape", memory_wrong_shape, ValueError, ["memoize", "'z'", "(5,)"]),
    ("unknown latent name", unknown_latent_name, ValueError, ["traced_evaluate", "'zz'", "'z'"]),
    ("zero particles", zero_particles, ValueError, ["propose", "plate", "positive"]),
    ("float seed", float_seed, TypeError, ["traced_evaluate", "seed", "float"]),
    ("uint32 key (3,)", uint32_key_of_three, TypeError, ["traced_evaluate", "(3,)"]),
    ("batch of typed keys", batch_of_typed_keys, TypeError, ["traced_evaluate", "batch", "(3,)"]),
    ("int32 key", int32_key, TypeError, ["traced_evaluate", "int32"]),
    ("jit-compiled program", jitted_program, TypeError, ["propose", "'q'", "jit"]),
    ("missing argument", missing_argument, TypeError, ["traced_evaluate", "'q'", "'x'"]),
    ("two plates at one dim", two_plates_one_dim, ValueError, ["traced_evaluate", "plate", "dim"]),
    ("observation as list", observation_as_list, TypeError, ["traced_evaluate", "'x'", "list"]),
    ("observation as string", observation_as_string, TypeError, ["traced_evaluate", "'x'", "str"]),
    ("plate too small", plate_too_small, ValueError, ["traced_evaluate", "plate", "(5,)"]),
    ("resample num_samples=True", resample_bool, ValueError, ["resample", "num_samples", "True"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, error, words", [row[1:] for row in GALLERY], ids=[row[0] for row in GALLERY]
)
def test_mistake_raises_a_named_error(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_checked_mode_names_the_site_of_nan_data_under_jit():
    def run(data, key):
        def p():
            with numpyro.plate("particles", 3):
                numpyro.sample("x", dist.Normal(0.0, 1.0), obs=data)

        return coix.traced_evaluate(p, seed=key)()[2].log_Z

    checked = coix.checked(run)
    with pytest.raises(Exception, match="'x'"):
        checked(jnp.array([0.1, jnp.nan, 0.2]), KEY)


def test_checked_mode_names_the_site_of_out_of_support_data_under_jit():
    def run(data, key):
        def p():
            with numpyro.plate("particles", 3):
                numpyro.sample("x", dist.Bernoulli(0.5), obs=data)

        return coix.traced_evaluate(p, seed=key)()[2].log_Z

    checked = coix.checked(run)
    with pytest.raises(Exception, match="'x'.*support"):
        checked(jnp.array([1.0, 2.0, 0.0]), KEY)
    # Valid data passes and gives the closed-form value.
    log_z = checked(jnp.array([1.0, 0.0, 1.0]), KEY)
    # Each particle observes one value: every log weight is log 0.5.
    np.testing.assert_allclose(log_z, np.log(0.5), rtol=1e-5)


def test_valid_numpy_scalars_are_accepted():
    q = coix.propose(normal_target(4), normal_proposal(4))
    resampled = coix.resample(q, num_samples=np.int64(4))
    _, _, metrics = evaluate(resampled)
    assert metrics.log_weight.shape == (4,)
    adaptive = coix.resample(q, ess_threshold=np.float32(0.5))
    _, _, metrics = evaluate(adaptive)
    assert metrics.log_weight.shape == (4,)


def test_the_mistakes_give_numbers_once_corrected():
    """The corrected counterparts of the layout rows give the exact log Z."""
    data = jnp.array([0.3, -0.2, 0.9])
    n = 20_000
    p = normal_target(n, particle_dim=-2, data=data, data_dim=-1)
    program = coix.propose(p, normal_proposal(n, particle_dim=-2))

    def q():
        with numpyro.plate("particles", n, dim=-2):
            return (numpyro.sample("z", dist.Normal(jnp.zeros((n, 1)), 1.0)),)

    program = coix.propose(p, q)
    _, _, metrics = jax.jit(lambda k: coix.traced_evaluate(program, seed=k)())(KEY)
    # y_i | z ~ N(z, 1), z ~ N(0, 1): y ~ N(0, I + 11^T).
    cov = np.eye(3) + np.ones((3, 3))
    exact = -0.5 * (
        data @ np.linalg.solve(cov, data)
        + np.log(np.linalg.det(cov))
        + 3 * np.log(2 * np.pi)
    )
    assert abs(float(metrics.log_Z) - exact) < 0.05
