"""combinators.weights: particle layout, log Z, normalised weights and ESS.

Pure array maths on hand-made sites and log weights; every expected value is
computed by hand (numpy, float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from combinators import weights
from combinators.core.trace import Plate, Site, Trace

K = 4  # particles
D = 3  # data points


def site(shape, plates=(), observed=False, fill=1.0):
    return Site(
        jnp.zeros(shape),
        jnp.full(shape, fill),
        observed=observed,
        plates=tuple(plates),
    )


def logmeanexp(x, axis=0):
    x = np.asarray(x, np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.mean(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)
    return out


# ---------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------


def test_layout_of_a_particle_plate():
    particles = Plate("particles", K, -1)
    layout = weights.layout_of([site((K,), [particles])])
    assert layout.frames == (particles,) and layout.shape == (K,)
    assert layout.ndim == 1 and layout.particle_plate == particles
    assert layout.frame_at(-1) == particles and layout.frame_at(-2) is None
    assert weights.layout_of([site(())]) == weights.Layout(())
    assert weights.layout_of().shape == ()


def test_layout_keeps_a_data_plate_that_every_site_spans():
    particles, data = Plate("particles", K, -2), Plate("data", D, -1)
    z = site((K, D), [particles, data])
    x = site((K, D), [particles, data], observed=True)
    layout = weights.layout_of(Trace.from_sites({"z": z, "x": x}))
    assert layout.frames == (particles, data) and layout.shape == (K, D)
    assert layout.frame_at(-2) == particles and layout.frame_at(-1) == data


def test_layout_sums_a_data_plate_that_a_shared_site_does_not_span():
    # mu is drawn once per particle: it couples the data points, so the
    # data plate is no column axis.
    particles, data = Plate("particles", K, -2), Plate("data", D, -1)
    mu = site((K, 1), [particles])
    x = site((K, D), [particles, data], observed=True)
    layout = weights.layout_of([mu, x])
    assert layout.frames == (particles, None) and layout.shape == (K, 1)
    np.testing.assert_allclose(
        weights.trace_log_prob([mu, x], layout), np.full((K, 1), 1.0 + D)
    )


def test_an_undeclared_batch_dim_that_every_site_shares_is_a_column():
    # Coix's convention: a batch of independent problems written without a
    # plate (e.g. 3 data sets) gives one weight column per entry.
    particles = Plate("particles", K, -2)
    z = site((K, 3), [particles])
    y = site((K, 3), [particles], observed=True)
    layout = weights.layout_of([z, y])
    assert layout.shape == (K, 3)
    assert layout.frames[1] == weights.undeclared_batch(-1, 3)
    np.testing.assert_allclose(weights.trace_log_prob([z, y], layout), 2.0)


def test_an_undeclared_batch_dim_that_a_site_does_not_span_is_summed():
    # mu has one value per particle: it couples the 3 entries, so they are
    # one joint problem and their log densities add up.
    particles = Plate("particles", K, -2)
    mu = site((K, 1), [particles])
    y = site((K, 3), [particles], observed=True)
    layout = weights.layout_of([mu, y])
    assert layout.frames == (particles, None)
    np.testing.assert_allclose(weights.trace_log_prob([mu, y], layout), 4.0)


def test_undeclared_columns_stop_at_the_first_dim_not_shared():
    # Coix keeps the leading shared dims only: dim -2 is shared (B = 2),
    # dim -1 is not (5 vs 1), so the layout is (K, 2, 1).
    particles = Plate("particles", K, -3)
    a = site((K, 2, 5), [particles])
    b = site((K, 2, 1), [particles])
    layout = weights.layout_of([a, b])
    assert layout.shape == (K, 2, 1)
    c = site((K, 1, 5), [particles])
    assert weights.layout_of([a, c]).shape == (K, 1, 1)


def test_plates_of_two_sizes_at_one_dim_are_no_axis():
    particles = Plate("particles", K, -2)
    a = site((K, 2), [particles, Plate("left", 2, -1)])
    b = site((K, 5), [particles, Plate("right", 5, -1)])
    layout = weights.layout_of([a, b])
    assert layout.frames == (particles, None)


def test_one_dim_and_size_under_two_names_is_one_axis_named_first():
    a = site((K,), [Plate("first", K, -1)])
    b = site((K,), [Plate("second", K, -1)])
    assert weights.layout_of([a], [b]).frames == (Plate("first", K, -1),)


def test_a_plate_name_at_two_dims_raises():
    a = site((K,), [Plate("particles", K, -1)])
    b = site((K, 1), [Plate("particles", K, -2)])
    with pytest.raises(
        ValueError,
        match=r"propose: plate 'particles' has size 4 at dim -1 \(site 'a'\) but "
        r"size 4 at dim -2 \(site 'b'\)",
    ):
        weights.layout_of(Trace.from_sites({"a": a, "b": b}), where="propose")


def test_a_plate_name_with_two_sizes_raises():
    a = site((K,), [Plate("data", K, -1)])
    b = site((K + 1,), [Plate("data", K + 1, -1)])
    with pytest.raises(ValueError, match=r"plate 'data' has size 4 .* but size 5"):
        weights.layout_of([a, b])


def test_a_particles_plate_right_of_another_plate_raises():
    batch, particles = Plate("batch", 2, -2), Plate("particles", K, -1)
    s = site((2, K), [batch, particles])
    with pytest.raises(
        ValueError,
        match=r"layout: the particle plate 'particles' \(size 4\) is at dim -1 .*"
        r"plate 'batch' is at dim -2, to its left",
    ):
        weights.layout_of([s])
    # Another site holding the leftmost dim is also caught.
    other = site((2, 1), [batch])
    with pytest.raises(ValueError, match="the particle axis is the leftmost"):
        weights.layout_of([site((K,), [particles])], [other])


# ---------------------------------------------------------------------------
# reduce_to_layout, site_log_weight, trace_log_prob.
# ---------------------------------------------------------------------------


def test_reduce_to_layout_sums_what_is_not_a_plate_of_the_layout():
    particles, data = Plate("particles", K, -2), Plate("data", D, -1)
    layout = weights.Layout((particles, data))
    x = np.arange(2 * K * D, dtype=np.float32).reshape(2, K, D)
    # A leading dim beyond the layout is summed away.
    np.testing.assert_allclose(weights.reduce_to_layout(x, layout), x.sum(0))
    # A size-1 dim at a plate broadcasts to the plate's size.
    col = x[0, :, :1]
    np.testing.assert_allclose(
        weights.reduce_to_layout(col, layout), np.broadcast_to(col, (K, D))
    )
    # A scalar broadcasts to the layout shape.
    np.testing.assert_allclose(
        weights.reduce_to_layout(2.0, layout), np.full((K, D), 2.0)
    )
    # Only the given plates are kept: the data dim is summed, then broadcast.
    np.testing.assert_allclose(
        weights.reduce_to_layout(x[0], layout, plates=[particles]),
        np.broadcast_to(x[0].sum(1, keepdims=True), (K, D)),
    )
    # A dim where the layout has no plate is summed (keepdims).
    summed = weights.Layout((particles, None))
    np.testing.assert_allclose(
        weights.reduce_to_layout(x[0], summed), x[0].sum(1, keepdims=True)
    )


def test_reduce_to_layout_rejects_a_particle_count_of_another_size():
    layout = weights.Layout((Plate("particles", K, -1),))
    with pytest.raises(
        ValueError, match=r"resample: .* size 3 at dim -1, where the layout has"
    ):
        weights.reduce_to_layout(jnp.zeros(3), layout, where="resample")


def test_trace_log_prob_adds_sites_in_the_layout_shape():
    particles = Plate("particles", K, -1)
    layout = weights.Layout((particles,))
    a = site((K,), [particles], fill=-1.0)
    b = site((2, K), [particles], fill=0.25)  # an undeclared leading dim
    shared = site((), fill=3.0)  # outside every plate: added to each particle
    total = weights.trace_log_prob([a, b, shared], layout)
    np.testing.assert_allclose(total, np.full(K, -1.0 + 0.5 + 3.0))
    np.testing.assert_allclose(weights.trace_log_prob([], layout), np.zeros(K))


# ---------------------------------------------------------------------------
# log Z, normalised weights, ESS.
# ---------------------------------------------------------------------------

LOG_WEIGHT = np.array(
    [[0.0, -1.0, 2.0], [1.0, -1.0, -3.0], [-2.0, -1.0, 0.5], [0.5, -1.0, 0.0]],
    np.float32,
)


def test_log_normalizer_is_log_mean_exp_per_column_summed():
    expected = np.sum(logmeanexp(LOG_WEIGHT))
    np.testing.assert_allclose(weights.log_normalizer(LOG_WEIGHT), expected, rtol=1e-6)
    # One column: logsumexp - log N.
    col = LOG_WEIGHT[:, 0]
    np.testing.assert_allclose(
        weights.log_normalizer(col),
        np.log(np.sum(np.exp(col.astype(np.float64)))) - np.log(K),
        rtol=1e-6,
    )
    # Equal weights: log Z is the weight.
    np.testing.assert_allclose(weights.log_normalizer(np.full(K, -1.0)), -1.0)
    # A single unbatched weight is its own estimate.
    assert float(weights.log_normalizer(jnp.float32(-2.5))) == -2.5


def test_normalize_is_softmax_along_the_particle_axis():
    w = np.exp(LOG_WEIGHT.astype(np.float64))
    np.testing.assert_allclose(
        weights.normalize(LOG_WEIGHT), w / w.sum(0), rtol=1e-6, atol=1e-7
    )
    # (K, 1): the particle plate at dim -2. Softmax over the last axis would
    # give all ones; normalize sums to one over the particles.
    column = LOG_WEIGHT[:, :1]
    normalized = weights.normalize(column)
    assert normalized.shape == (K, 1)
    np.testing.assert_allclose(normalized[:, 0], w[:, 0] / w[:, 0].sum(), rtol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(column), np.ones((K, 1)))


def test_mean_and_column_effective_sample_sizes():
    equal = np.zeros(K)
    one_hot = np.array([0.0, -np.inf, -np.inf, -np.inf])
    two_valued = np.log([1.0, 1.0, 3.0, 3.0])  # ESS = 8^2 / 20 = 3.2
    log_weight = np.stack([equal, one_hot, two_valued], axis=1).astype(np.float32)
    column = weights.column_effective_sample_size(log_weight)
    np.testing.assert_allclose(column, [K, 1.0, 3.2], rtol=1e-6)
    np.testing.assert_allclose(
        weights.mean_effective_sample_size(log_weight), (K + 1.0 + 3.2) / 3, rtol=1e-6
    )
    assert weights.effective_sample_size is weights.mean_effective_sample_size
    # Shape (K, 1) is one column.
    np.testing.assert_allclose(
        weights.mean_effective_sample_size(log_weight[:, 2:]), 3.2, rtol=1e-6
    )
    # The ESS is invariant to a shift of the log weights.
    np.testing.assert_allclose(
        weights.column_effective_sample_size(log_weight + 50.0), column, rtol=1e-5
    )
    assert float(weights.mean_effective_sample_size(jnp.float32(-7.0))) == 1.0


@pytest.mark.parametrize(
    "bad, log_z",
    [
        ([0.0, np.nan, 1.0, 2.0], np.nan),
        ([0.0, np.inf, 1.0, 2.0], np.inf),
        ([-np.inf] * K, -np.inf),
    ],
    ids=["nan", "inf", "all-minus-inf"],
)
def test_non_finite_columns_give_nan_and_leave_other_columns_alone(bad, log_z):
    log_weight = np.stack([np.zeros(K), np.asarray(bad)], axis=1).astype(np.float32)
    column = weights.column_effective_sample_size(log_weight)
    assert float(column[0]) == pytest.approx(K) and np.isnan(column[1])
    assert np.isnan(weights.mean_effective_sample_size(log_weight))
    normalized = weights.normalize(log_weight)
    np.testing.assert_allclose(normalized[:, 0], np.full(K, 1.0 / K))
    assert np.all(np.isnan(normalized[:, 1]))
    np.testing.assert_equal(float(weights.log_normalizer(log_weight[:, 1])), log_z)
    np.testing.assert_equal(float(weights.log_normalizer(log_weight)), log_z)


def test_a_nan_scalar_log_weight_has_nan_ess():
    assert np.isnan(weights.mean_effective_sample_size(jnp.float32(np.nan)))
    assert np.isnan(weights.log_normalizer(jnp.float32(np.nan)))


def test_a_minus_infinity_weight_is_a_zero_weight():
    log_weight = np.array([0.0, -np.inf, 0.0, -np.inf], np.float32)
    np.testing.assert_allclose(weights.normalize(log_weight), [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(weights.column_effective_sample_size(log_weight), 2.0)
    np.testing.assert_allclose(
        weights.log_normalizer(log_weight), np.log(2.0 / K), rtol=1e-6
    )


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_a_non_finite_scalar_log_weight_has_nan_ess_like_one_particle(value):
    as_column = weights.mean_effective_sample_size(jnp.array([value], jnp.float32))
    assert np.isnan(as_column)
    assert np.isnan(weights.mean_effective_sample_size(jnp.float32(value)))
