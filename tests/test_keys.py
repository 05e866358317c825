"""combinators.core.keys: keys from arguments or seed handlers, checked seeds.

Every split is compared with ``jax.random`` applied key by key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import combinators as coix
from combinators.core import keys


def key_data(key):
    """Raw uint32 data of typed or raw keys, for exact comparison."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def assert_same_keys(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(key_data(a), key_data(b))


TYPED = jax.random.key(3)
RAW = jax.random.PRNGKey(3)
KEYS = {
    "typed": TYPED,
    "raw": RAW,
    "typed-batch": jax.random.split(TYPED, 3),
    "raw-batch": jax.random.split(RAW, 3),
    "typed-matrix": jax.random.split(TYPED, 6).reshape(2, 3),
}


def per_key(fn, key):
    """``fn`` applied to each key of a (possibly batched) key array."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    batch = key.shape if typed else key.shape[:-1]
    flat = key.reshape((-1,) if typed else (-1, 2))
    return [fn(flat[i]) for i in range(int(np.prod(batch, dtype=int)))], batch


@pytest.mark.parametrize("name", KEYS)
def test_split_key_splits_each_key_in_two(name):
    key = KEYS[name]
    a, b = keys.split_key(key)
    assert a.shape == b.shape == key.shape and a.dtype == key.dtype
    expected, batch = per_key(lambda k: jax.random.split(k, 2), key)
    flat_a = a.reshape((-1, *a.shape[len(batch) :]))
    flat_b = b.reshape((-1, *b.shape[len(batch) :]))
    for i, pair in enumerate(expected):
        assert_same_keys(flat_a[i], pair[0])
        assert_same_keys(flat_b[i], pair[1])
    assert not np.array_equal(key_data(a), key_data(b))


@pytest.mark.parametrize("name", KEYS)
def test_split_key_n_stacks_num_keys_on_a_new_axis(name):
    key = KEYS[name]
    out = keys.split_key_n(key, 4)
    assert out.shape == (4, *key.shape) and out.dtype == key.dtype
    expected, batch = per_key(lambda k: jax.random.split(k, 4), key)
    for j in range(4):
        flat = out[j].reshape((-1, *out.shape[1 + len(batch) :]))
        for i, split in enumerate(expected):
            assert_same_keys(flat[i], split[j])
    assert keys.split_key_n(key, 0).shape == (0, *key.shape)


@pytest.mark.parametrize("name", KEYS)
def test_fold_in_key_folds_each_key(name):
    key = KEYS[name]
    out = keys.fold_in_key(key, 7)
    assert out.shape == key.shape and out.dtype == key.dtype
    expected, batch = per_key(lambda k: jax.random.fold_in(k, 7), key)
    flat = out.reshape((-1, *out.shape[len(batch) :]))
    for i, folded in enumerate(expected):
        assert_same_keys(flat[i], folded)
    # Under jit with a traced index, too.
    traced = jax.jit(keys.fold_in_key)(key, jnp.int32(7))
    np.testing.assert_array_equal(key_data(traced), key_data(out))


def test_split_program_args_splits_a_key_argument_only():
    (kp, x1), (kq, x2) = keys.split_program_args((TYPED, 1.0))
    expected = jax.random.split(TYPED, 2)
    assert_same_keys(kp, expected[0])
    assert_same_keys(kq, expected[1])
    assert x1 == x2 == 1.0
    args = (jnp.ones(2), 3)
    assert keys.split_program_args(args) == (args, args)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((TYPED,), True),
        ((RAW, 1.0), True),
        ((jax.random.split(TYPED, 3),), True),
        ((jax.random.split(RAW, 3),), True),
        ((), False),
        ((None,), False),
        ((3,), False),
        ((jnp.zeros(2),), False),  # float32
        ((jnp.zeros(2, jnp.int32),), False),
        ((jnp.zeros(3, jnp.uint32),), False),
        ((jnp.zeros((), jnp.uint32),), False),
        ((np.zeros(2, np.uint32),), False),  # numpy, not a jax array
        ((1.0, TYPED), False),  # only the first argument counts
    ],
)
def test_can_extract_key(args, expected):
    assert keys.can_extract_key(args) is expected


@pytest.mark.parametrize(
    "seed",
    [None, jax.random.key(0), jax.random.PRNGKey(0), 0, 12345],
    ids=["none", "typed", "raw", "zero", "int"],
)
def test_check_seed_accepts_one_key_or_an_int(seed):
    keys.check_seed("traced_evaluate", seed)


@pytest.mark.parametrize(
    "seed, problem",
    [
        (1.5, "float 1.5"),
        (True, "bool True"),
        ("0", "str '0'"),
        (jnp.zeros(2, jnp.int32), "dtype int32 and shape (2,)"),
        (jnp.zeros(2, jnp.float32), "dtype float32 and shape (2,)"),
        (jnp.zeros(3, jnp.uint32), "dtype uint32 and shape (3,)"),
        (jax.random.split(jax.random.PRNGKey(0), 2), "dtype uint32 and shape (2, 2)"),
        (jax.random.split(jax.random.key(0), 3), "a batch of typed keys of shape (3,)"),
    ],
    ids=["float", "bool", "str", "int32", "float32", "uint32-3", "raw-batch", "batch"],
)
def test_check_seed_rejects_anything_but_one_key(seed, problem):
    with pytest.raises(TypeError) as info:
        keys.check_seed("propose", seed)
    message = str(info.value)
    assert message.startswith("propose: seed must be one PRNG key")
    assert problem in message and "vmap over them" in message


def test_traced_evaluate_checks_its_seed_before_running():
    calls = []

    def program():
        calls.append(1)
        return numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="traced_evaluate: seed must be one PRNG key"):
        coix.traced_evaluate(program, seed=jax.random.split(jax.random.key(0), 2))
    assert not calls
    # An int seed and a raw key both run (and agree with the typed key).
    a = coix.traced_evaluate(program, seed=jax.random.key(4))()[0]
    b = coix.traced_evaluate(program, seed=jax.random.PRNGKey(4))()[0]
    c = coix.traced_evaluate(program, seed=4)()[0]
    assert float(a) == float(b) == float(c)


def test_require_key_outside_a_seed_handler_raises_with_instructions():
    with pytest.raises(
        ValueError,
        match=r"resample: no PRNG key was given; pass one with "
        r"traced_evaluate\(program, seed=jax.random.key\(0\)\)",
    ):
        keys.require_key("resample")
    assert keys.key_from_handlers() is None and not keys.has_seed_handler()
    # A block handler alone does not provide a key either.
    with handlers.block(), pytest.raises(ValueError, match="no PRNG key"):
        keys.require_key("resample")


def test_require_key_inside_a_seed_handler_draws_fresh_keys():
    def two_keys():
        return keys.require_key("x"), keys.require_key("x")

    a, b = handlers.seed(two_keys, rng_seed=0)()
    again, _ = handlers.seed(two_keys, rng_seed=0)()
    other, _ = handlers.seed(two_keys, rng_seed=1)()
    assert keys.can_extract_key((a,))
    assert not np.array_equal(key_data(a), key_data(b))
    np.testing.assert_array_equal(key_data(a), key_data(again))
    assert not np.array_equal(key_data(a), key_data(other))


def test_a_nested_evaluation_without_seed_takes_keys_from_the_enclosing_seed():
    def inner():
        return numpyro.sample("z", dist.Normal(0.0, 1.0))

    def outer():
        return coix.traced_evaluate(inner)()[0]

    a = handlers.seed(outer, rng_seed=0)()
    b = handlers.seed(outer, rng_seed=0)()
    c = handlers.seed(outer, rng_seed=1)()
    assert float(a) == float(b) and float(a) != float(c)
    with pytest.raises(ValueError, match="site 'z' needs a PRNG key"):
        outer()


def test_first_key_of_a_batch():
    batch = jax.random.split(TYPED, 3)
    assert_same_keys(keys.first_key(batch), batch[0])
    raw = jax.random.split(RAW, 3)
    assert_same_keys(keys.first_key(raw), raw[0])
    assert_same_keys(keys.first_key(TYPED), TYPED)


def test_key_stream_hands_out_the_keys_of_one_split_in_order():
    # The first POOL_SIZE statements take keys 1..POOL_SIZE of one split of
    # the seed; the next ones come from a split of key 0: every key is a
    # distinct threefry output, as numpyro's split-per-statement would give.
    count = 2 * keys.POOL_SIZE + 3

    def many():
        return [keys.require_key("x") for _ in range(count)]

    for seed in (TYPED, RAW):
        drawn = keys.key_stream(many, seed)()
        first = jax.random.split(seed, keys.POOL_SIZE + 1)
        second = jax.random.split(first[0], keys.POOL_SIZE + 1)
        for i in range(keys.POOL_SIZE):
            assert_same_keys(drawn[i], first[i + 1])
            assert_same_keys(drawn[keys.POOL_SIZE + i], second[i + 1])
        data = {tuple(key_data(k).ravel()) for k in drawn}
        assert len(data) == count  # no key handed out twice


def test_key_stream_draws_are_independent_standard_normals():
    # 2 * POOL_SIZE + 3 statements per evaluation, 4000 evaluations: every
    # statement's values have mean 0 and variance 1, and statements taken
    # from one pool or from two are uncorrelated (|r| < 5 / sqrt(4000)).
    count = 2 * keys.POOL_SIZE + 3

    def program():
        return jnp.stack(
            [numpyro.sample(f"z{i}", dist.Normal(0.0, 1.0)) for i in range(count)]
        )

    draws = jax.vmap(lambda k: keys.key_stream(program, k)())(
        jax.random.split(jax.random.key(7), 4000)
    )
    draws = np.asarray(draws)
    bound = 5 / np.sqrt(draws.shape[0])
    assert np.all(np.abs(draws.mean(0)) < bound)
    assert np.all(np.abs(draws.var(0) - 1) < 5 * np.sqrt(2 / draws.shape[0]))
    corr = np.corrcoef(draws.T) - np.eye(count)
    assert np.max(np.abs(corr)) < bound


def test_a_nested_evaluation_takes_its_keys_from_the_parents_stream():
    # lazy_seed derives nothing: its statements take the parent's next keys,
    # so an SMC step seeded once derives its keys in one split.
    def inner():
        return numpyro.sample("z", dist.Normal(0.0, 1.0))

    def outer():
        a = keys.require_key("x")
        z = coix.traced_evaluate(inner)()[0]
        return a, z

    a, z = coix.traced_evaluate(outer, seed=TYPED)()[0]
    pool = jax.random.split(TYPED, keys.POOL_SIZE + 1)
    assert_same_keys(a, pool[1])
    expected = dist.Normal(0.0, 1.0).sample(pool[2])
    np.testing.assert_array_equal(np.asarray(z), np.asarray(expected))
    # Under numpyro's own seed the nested evaluation splits that seed's key.
    b, w = handlers.seed(outer, rng_seed=TYPED)()
    k1, rest = jax.random.split(TYPED)[::-1]
    k2 = jax.random.split(rest)[1]
    assert_same_keys(b, k1)
    np.testing.assert_array_equal(
        np.asarray(w), np.asarray(dist.Normal(0.0, 1.0).sample(k2))
    )
