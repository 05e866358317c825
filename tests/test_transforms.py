"""combinators.core.transforms: suffix, detach, stick_the_landing, scope and
map_fresh_samples.

Model of the gradient tests: z = loc + s * eps under q = N(loc, s^2), so

  d/dloc z = 1,  d/dloc log q(z) = 0 (the value and parameter paths cancel),
  value path only:     d/dloc log q(z; stop(loc)) = -(z - loc) / s^2,
  parameter path only: d/dloc log q(stop(z); loc) = (z - loc) / s^2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import weights
from combinators.core import transforms

N = 5
SCALE = 1.7
KEY = jax.random.key(0)


def q(loc):
    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(loc, SCALE))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
        return (z,)

    return program


def evaluate(program, key=KEY):
    return coix.traced_evaluate(program, seed=key)()


# ---------------------------------------------------------------------------
# suffix.
# ---------------------------------------------------------------------------


def test_suffix_deepens_every_sample_site_by_one_generation():
    _, plain, _ = evaluate(q(0.0))
    _, once, _ = evaluate(coix.suffix(q(0.0)))
    _, twice, _ = evaluate(coix.suffix(coix.suffix(q(0.0))))
    assert [s.depth for s in plain.values()] == [0, 0]
    assert [s.depth for s in once.values()] == [1, 1]
    assert [s.depth for s in twice.values()] == [2, 2]
    # Names are kept, values and densities are unchanged.
    assert list(once) == list(plain) == ["z", "y"]
    np.testing.assert_array_equal(once["z"].value, plain["z"].value)
    np.testing.assert_array_equal(once["y"].log_prob, plain["y"].log_prob)


def test_suffixed_site_becomes_an_older_generation_of_the_same_name():
    def kernel(z):
        with numpyro.plate("particles", N):
            return (numpyro.sample("z", dist.Normal(z + 10.0, 0.1)),)

    def chained():
        return kernel(*coix.suffix(q(0.0))())

    _, trace, _ = evaluate(chained)
    newest, older = trace.history("z")
    assert (newest.depth, older.depth) == (0, 1)
    np.testing.assert_allclose(
        newest.log_prob,
        dist.Normal(older.value + 10.0, 0.1).log_prob(newest.value),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        older.log_prob, dist.Normal(0.0, SCALE).log_prob(older.value), rtol=1e-6
    )

    def clashing():
        return kernel(*q(0.0)())

    with pytest.raises(ValueError, match="duplicate site name 'z'"):
        evaluate(clashing)


# ---------------------------------------------------------------------------
# detach and stick_the_landing.
# ---------------------------------------------------------------------------


def value_and_log_q(loc, transform=None):
    program = q(loc) if transform is None else transform(q(loc))
    _, trace, _ = evaluate(program)
    return jnp.sum(trace["z"].value), jnp.sum(trace["z"].log_prob), trace


def gradients(transform=None, loc=0.3):
    def both(loc):
        value, log_q, _ = value_and_log_q(loc, transform)
        return jnp.stack([value, log_q])

    d_value, d_log_q = jax.jacfwd(both)(loc)
    z = value_and_log_q(loc)[2]["z"].value
    return float(d_value), float(d_log_q), np.asarray(z, np.float64) - loc


def test_transforms_keep_values_and_densities():
    _, _, plain = value_and_log_q(0.3)
    for transform in (coix.detach, coix.stick_the_landing):
        _, _, trace = value_and_log_q(0.3, transform)
        for name in ("z", "y"):
            np.testing.assert_array_equal(trace[name].value, plain[name].value)
            np.testing.assert_allclose(
                trace[name].log_prob, plain[name].log_prob, rtol=1e-6
            )
        assert trace["y"].observed and not trace["z"].observed


def test_without_a_transform_the_two_paths_of_log_q_cancel():
    d_value, d_log_q, _ = gradients()
    assert d_value == pytest.approx(N)
    assert abs(d_log_q) < 1e-5


def test_detach_stops_value_gradients_and_keeps_parameter_gradients():
    d_value, d_log_q, centred = gradients(coix.detach)
    assert d_value == 0.0
    # Parameter path only: sum (z - loc) / s^2 (not zero, unlike the sum of
    # both paths above).
    expected = np.sum(centred) / SCALE**2
    assert d_log_q == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_stick_the_landing_stops_parameter_gradients_and_keeps_the_value_path():
    d_value, d_log_q, centred = gradients(coix.stick_the_landing)
    assert d_value == pytest.approx(N)
    # Value path only: -sum (z - loc) / s^2.
    expected = -np.sum(centred) / SCALE**2
    assert d_log_q == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_detach_and_stick_the_landing_leave_observed_sites_alone():
    # d/dloc log N(y; z, 1) with z = loc + s eps is sum (y - z): it flows
    # through the value of z, so detach removes it and STL keeps it.
    def d_log_y(transform):
        def log_y(loc):
            program = q(loc) if transform is None else transform(q(loc))
            return jnp.sum(evaluate(program)[1]["y"].log_prob)

        return float(jax.grad(log_y)(0.3))

    z = np.asarray(evaluate(q(0.3))[1]["z"].value, np.float64)
    assert d_log_y(None) == pytest.approx(np.sum(0.5 - z), rel=1e-4)
    assert d_log_y(coix.stick_the_landing) == pytest.approx(np.sum(0.5 - z), rel=1e-4)
    assert d_log_y(coix.detach) == 0.0


# ---------------------------------------------------------------------------
# scope.
# ---------------------------------------------------------------------------


def test_scope_renames_sample_sites_but_not_plates():
    scoped = transforms.scope(q(0.0), "layer0")
    _, trace, _ = evaluate(scoped)
    assert list(trace) == ["layer0/z", "layer0/y"]
    assert trace["layer0/z"].plates == (coix.Plate("particles", N, -1),)
    assert trace["layer0/y"].observed
    # Same values as the unscoped program under the same key.
    np.testing.assert_array_equal(
        trace["layer0/z"].value, evaluate(q(0.0))[1]["z"].value
    )
    assert transforms.scope_parts(scoped)[:2] == ("layer0", "/")
    assert transforms.scope_parts(q(0.0)) is None


def test_two_scoped_copies_share_one_particle_axis():
    def both():
        transforms.scope(q(0.0), "a")()
        transforms.scope(q(1.0), "b")()

    _, trace, metrics = evaluate(both)
    assert list(trace) == ["a/z", "a/y", "b/z", "b/y"]
    layout = weights.layout_of(trace)
    assert layout.shape == (N,)
    expected = dist.Normal(trace["a/z"].value, 1.0).log_prob(0.5) + dist.Normal(
        trace["b/z"].value, 1.0
    ).log_prob(0.5)
    np.testing.assert_allclose(metrics.log_weight, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# map_fresh_samples.
# ---------------------------------------------------------------------------


def test_map_fresh_samples_maps_draws_and_observations():
    seen = {}

    def site_fn(*, name, frames, shape, event_dim, replayed):
        seen[name] = ([f.name for f in frames], shape, event_dim, replayed)
        if name == "z":
            return lambda v: v + 100.0
        if name == "y":
            return lambda v: 2.0 * v
        return None

    def program():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand((3,)).to_event(1))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
        return z, w

    (z, w), trace, _ = evaluate(transforms.map_fresh_samples(program, site_fn))
    _, plain, _ = evaluate(program)
    assert seen == {
        "z": (["particles"], (N,), 0, False),
        "w": (["particles"], (N, 3), 1, False),
        "y": (["particles"], (), 0, False),
    }
    # The function applies to the draw, and what the program sees is mapped.
    np.testing.assert_allclose(trace["z"].value, plain["z"].value + 100.0, rtol=1e-6)
    np.testing.assert_array_equal(z, trace["z"].value)
    np.testing.assert_allclose(
        trace["z"].log_prob, dist.Normal(0.0, 1.0).log_prob(z), rtol=1e-6
    )
    # None leaves a site alone.
    np.testing.assert_array_equal(trace["w"].value, plain["w"].value)
    # The observation is mapped and scored at the mapped value.
    assert float(trace["y"].value) == 1.0 and trace["y"].observed
    np.testing.assert_allclose(
        trace["y"].log_prob, dist.Normal(z, 1.0).log_prob(1.0), rtol=1e-6
    )


def test_map_fresh_samples_tells_replayed_sites_apart():
    out, trace, metrics = evaluate(q(0.0))
    flags = {}

    def site_fn(*, name, frames, shape, event_dim, replayed):
        flags[name] = replayed
        return None

    replay = coix.empirical(out, trace, metrics)
    _, replayed, _ = evaluate(transforms.map_fresh_samples(replay, site_fn))
    assert flags == {"z": True, "y": True}
    np.testing.assert_array_equal(replayed["z"].value, trace["z"].value)
