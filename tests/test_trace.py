"""combinators.core.trace: Site, Plate and Trace as pytrees and as mappings."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators.core.trace import Plate, Site, Trace

N = 4
PARTICLES = Plate("particles", N, -1)


def site(value, log_prob=None, **meta):
    value = jnp.asarray(value, jnp.float32)
    log_prob = -value if log_prob is None else jnp.asarray(log_prob, jnp.float32)
    return Site(value, log_prob, **meta)


def three_generations():
    """``z``: newest (latent), middle (auxiliary), oldest; ``y``: observed."""
    z0 = site(jnp.arange(N) + 0.0, plates=(PARTICLES,))
    z1 = site(jnp.arange(N) + 10.0, plates=(PARTICLES,), auxiliary=True, depth=3)
    z2 = site(jnp.arange(N) + 20.0, plates=(PARTICLES,), depth=7)
    y = site(1.5, jnp.full(N, -0.5), observed=True, plates=(PARTICLES,))
    aux = site(jnp.zeros(N), plates=(PARTICLES,), auxiliary=True)
    return Trace({"z": (z0, z1, z2), "y": (y,), "u": (aux,)})


def assert_sites_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    leaves = zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    )
    for x, y in leaves:
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# Site.
# ---------------------------------------------------------------------------


def test_sites_are_typed_pytrees_with_roles_in_fields():
    # Moved from test_core.py.
    def target():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    _, trace, _ = coix.traced_evaluate(target, seed=jax.random.key(0))()
    z, y = trace["z"], trace["y"]
    assert isinstance(z, coix.Site) and not z.observed and y.observed
    assert z.plates == (coix.Plate("particles", N, -1),)
    assert z.log_prob.shape == (N,)
    np.testing.assert_allclose(
        z.log_prob, dist.Normal(0.0, 1.0).log_prob(z.value), rtol=1e-6
    )
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, trace)
    np.testing.assert_allclose(doubled["z"].value, 2 * z.value)
    assert doubled["y"].observed  # static metadata survives tree_map
    # Coix-style reads keep working.
    assert trace["z"]["value"] is z.value and "is_observed" in trace["y"]


def test_site_flattens_to_value_and_log_prob_and_keeps_metadata_static():
    s = site(
        jnp.ones((N, 2)),
        jnp.full(N, -3.0),
        observed=True,
        event_dim=1,
        plates=(PARTICLES,),
        auxiliary=True,
        reparameterized=False,
        deterministic=True,
        depth=2,
    )
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 2
    np.testing.assert_array_equal(leaves[0], s.value)
    np.testing.assert_array_equal(leaves[1], s.log_prob)
    rebuilt = jax.tree_util.tree_unflatten(treedef, [2 * leaf for leaf in leaves])
    assert isinstance(rebuilt, Site)
    np.testing.assert_array_equal(rebuilt.value, 2 * s.value)
    np.testing.assert_array_equal(rebuilt.log_prob, 2 * s.log_prob)
    assert (
        rebuilt.observed,
        rebuilt.event_dim,
        rebuilt.plates,
        rebuilt.auxiliary,
        rebuilt.reparameterized,
        rebuilt.deterministic,
        rebuilt.depth,
    ) == (True, 1, (PARTICLES,), True, False, True, 2)
    # Metadata is part of the structure: a site with another role is another
    # tree, so jit retraces instead of mixing them up.
    assert treedef != jax.tree_util.tree_structure(s.replace(observed=False))
    assert treedef != jax.tree_util.tree_structure(s.replace(depth=0))


def test_site_passes_through_jit_with_its_metadata():
    s = site(jnp.arange(N), plates=(PARTICLES,), observed=True, depth=1)
    out = jax.jit(lambda x: jax.tree_util.tree_map(lambda v: v + 1, x))(s)
    assert isinstance(out, Site) and out.observed and out.depth == 1
    assert out.plates == (PARTICLES,)
    np.testing.assert_array_equal(out.value, s.value + 1)


def test_site_replace_returns_a_changed_copy():
    s = site(jnp.arange(N), plates=(PARTICLES,))
    changed = s.replace(auxiliary=True, value=jnp.zeros(N))
    assert changed.auxiliary and not s.auxiliary
    np.testing.assert_array_equal(changed.value, jnp.zeros(N))
    np.testing.assert_array_equal(s.value, jnp.arange(N))
    assert changed.log_prob is s.log_prob and changed.plates == s.plates
    with pytest.raises(TypeError):
        s.replace(not_a_field=1)
    with pytest.raises(AttributeError):  # frozen
        s.observed = True


def test_site_reads_like_a_coix_dict():
    latent = site(jnp.arange(N), plates=(PARTICLES,))
    observed = latent.replace(observed=True)
    assert latent["value"] is latent.value
    assert latent["log_prob"] is latent.log_prob
    assert "value" in latent and "log_prob" in latent
    assert "is_observed" not in latent and "is_observed" in observed
    assert observed["is_observed"] is True
    with pytest.raises(KeyError):
        latent["is_observed"]
    with pytest.raises(KeyError):
        latent["fn"]
    assert "fn" not in observed


def test_site_batch_shape_and_plate_lookup():
    data = Plate("data", 3, -1)
    particles = Plate("particles", N, -2)
    s = site(jnp.zeros((N, 3, 2)), jnp.zeros((N, 3)), plates=(particles, data))
    assert s.batch_shape == (N, 3)
    assert s.plate("data") == data and s.plate("particles") == particles
    assert s.plate("missing") is None
    assert Plate("data", 3, -1) == ("data", 3, -1)  # a plain named tuple


# ---------------------------------------------------------------------------
# Trace.
# ---------------------------------------------------------------------------


def test_trace_is_a_mapping_of_newest_sites():
    trace = three_generations()
    assert list(trace) == ["z", "y", "u"] and len(trace) == 3
    assert "z" in trace and "w" not in trace
    np.testing.assert_array_equal(trace["z"].value, jnp.arange(N))
    with pytest.raises(KeyError):
        trace["w"]
    assert dict(trace.items())["y"].observed


def test_history_and_generations_are_newest_first():
    trace = three_generations()
    values = [float(s.value[0]) for s in trace.history("z")]
    assert values == [0.0, 10.0, 20.0]
    gens = [
        (name, g, float(jnp.ravel(s.value)[0])) for name, g, s in trace.generations()
    ]
    assert gens == [
        ("z", 0, 0.0),
        ("z", 1, 10.0),
        ("z", 2, 20.0),
        ("y", 0, 1.5),
        ("u", 0, 0.0),
    ]
    histories = trace.histories()
    histories["z"] = ()  # a copy: the trace is unchanged
    assert len(trace.history("z")) == 3


def test_newest_and_marginal_drop_older_generations_and_auxiliary_sites():
    trace = three_generations()
    newest = trace.newest()
    assert list(newest) == ["z", "y", "u"]
    assert all(len(newest.history(name)) == 1 for name in newest)
    assert newest["z"] is trace["z"]
    marginal = trace.marginal()
    # u is auxiliary; z's newest generation is not (its older one is).
    assert list(marginal) == ["z", "y"]
    assert len(marginal.history("z")) == 1 and marginal["z"] is trace["z"]


def test_rebased_sets_depth_to_generation_and_keeps_values():
    trace = three_generations()
    assert [s.depth for s in trace.history("z")] == [0, 3, 7]
    rebased = trace.rebased()
    assert [s.depth for s in rebased.history("z")] == [0, 1, 2]
    assert [(name, g) for name, g, _ in rebased.generations()] == [
        (name, g) for name, g, _ in trace.generations()
    ]
    for (_, _, a), (_, _, b) in zip(
        trace.generations(), rebased.generations(), strict=True
    ):
        assert a.value is b.value and a.auxiliary == b.auxiliary
    # Sites already at their generation are kept as they are.
    assert rebased.history("z")[0] is trace.history("z")[0]


def test_map_sites_sees_name_generation_and_site():
    trace = three_generations()
    seen = []

    def fn(name, generation, s):
        seen.append((name, generation))
        return s.replace(value=s.value + generation)

    mapped = trace.map_sites(fn)
    assert seen == [(n, g) for n, g, _ in trace.generations()]
    np.testing.assert_array_equal(mapped.history("z")[2].value, jnp.arange(N) + 22.0)


def test_trace_flatten_unflatten_round_trip_keeps_names_and_generations():
    trace = three_generations()
    leaves, treedef = jax.tree_util.tree_flatten(trace)
    # Two leaves (value, log_prob) per generation, in generation order.
    assert len(leaves) == 2 * 5
    np.testing.assert_array_equal(leaves[2], trace.history("z")[1].value)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, Trace) and list(rebuilt) == list(trace)
    for name in trace:
        for a, b in zip(trace.history(name), rebuilt.history(name), strict=True):
            assert_sites_equal(a, b)
            assert a.depth == b.depth and a.auxiliary == b.auxiliary
    # Through jit, too.
    out = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 2, t))(trace)
    assert isinstance(out, Trace)
    assert [s.depth for s in out.history("z")] == [0, 3, 7]
    np.testing.assert_array_equal(out.history("z")[2].value, 2 * (jnp.arange(N) + 20))
    # Another number of generations is another tree.
    fewer = Trace({**trace.histories(), "z": trace.history("z")[:2]})
    assert jax.tree_util.tree_structure(fewer) != treedef


def test_from_sites_and_empty_histories():
    s = site(jnp.zeros(N))
    trace = Trace.from_sites({"a": s, "b": s.replace(observed=True)})
    assert len(trace.history("a")) == 1 and trace.history("a")[0] is s
    assert trace["b"].observed
    assert len(Trace()) == 0 and list(Trace().generations()) == []
    with pytest.raises(ValueError, match="site 'a' has an empty history"):
        Trace({"a": ()})
