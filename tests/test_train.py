"""The training harness: ``combinators.train`` and ``combinators.checkpoint``.

Each test states the property it checks: the loop equals a hand-written
optax loop; the caller's parameters survive buffer donation while the
intermediate buffers are consumed; a non-finite step changes nothing and is
counted; the history, evaluations and output modes; checkpoints restore bit
for bit, also in a fresh process; separate optimisers and separate losses
for the target (``p``) and proposal (``q``) groups; Flax linen, Flax NNX
and plain pytrees reach a known optimum.
"""

import functools
import itertools
import os
import pathlib
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx

import combinators as coix
from combinators import checkpoint
from combinators.train import TrainResult, group_optimizers, make_step, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def leaves_equal(a, b) -> bool:
    """Bit-for-bit equality of two pytrees (typed keys compared by key data)."""

    def data(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        data(x).dtype == data(y).dtype and np.array_equal(data(x), data(y))
        for x, y in zip(flat_a, flat_b, strict=True)
    )


def snapshot(tree):
    """Host copies of a pytree's leaves (the device buffers get donated)."""
    return jax.tree.map(np.array, tree)


# ---------------------------------------------------------------------------
# A small stochastic problem: w -> the batch plus noise drawn from the key.
# ---------------------------------------------------------------------------


def noisy_quadratic(params, key, batch):
    noise = 0.1 * jax.random.normal(key, batch.shape)
    loss = jnp.sum((params["w"] - batch - noise) ** 2)
    return loss, {"distance": jnp.sqrt(jnp.sum((params["w"] - batch) ** 2))}


def batches(start=0):
    """A deterministic data stream: step t gets ``sin(t + [0, 1, 2])``."""
    return (jnp.sin(t + jnp.arange(3.0)) for t in itertools.count(start + 1))


def test_train_equals_a_hand_written_optax_loop():
    optimizer = optax.adam(0.1)
    init = {"w": jnp.zeros(3)}
    params, metrics = train(
        noisy_quadratic, init, optimizer, 12, batches(), seed=3, progress=False
    )
    # The same updates by hand: step t uses fold_in(key(seed), t) and batch t.
    grad = jax.jit(jax.grad(lambda p, key, batch: noisy_quadratic(p, key, batch)[0]))
    update = jax.jit(optimizer.update)
    expected, state = init, optimizer.init(init)
    for t, batch in zip(range(1, 13), batches(), strict=False):
        key = jax.random.fold_in(jax.random.key(3), t)
        updates, state = update(grad(expected, key, batch), state, expected)
        expected = optax.apply_updates(expected, updates)
    np.testing.assert_allclose(params["w"], expected["w"], rtol=1e-5, atol=1e-6)
    assert set(metrics) >= {"loss", "distance", "skipped", "squared_grad_norm"}


def test_jit_and_eager_steps_agree():
    run = functools.partial(
        train, noisy_quadratic, {"w": jnp.zeros(3)}, optax.adam(0.1), 8,
        seed=1, progress=False, return_result=True,
    )  # fmt: skip
    compiled = run(batches(), jit_compile=True)
    eager = run(batches(), jit_compile=False)
    np.testing.assert_allclose(compiled.params["w"], eager.params["w"], rtol=1e-5)
    np.testing.assert_allclose(
        compiled.history["loss"], eager.history["loss"], rtol=1e-5
    )


def test_step_is_traced_once():
    traces = []

    def loss_fn(params, key, batch):
        traces.append(None)  # runs only while tracing
        return noisy_quadratic(params, key, batch)

    # Python-float parameters: weakly typed, yet the step must not retrace.
    train(loss_fn, {"w": 0.0}, optax.adam(0.1), 15, batches(), progress=False)
    assert len(traces) == 1


# ---------------------------------------------------------------------------
# Buffer donation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("donate", [True, False])
def test_donation_consumes_intermediates_and_spares_the_callers_arrays(donate):
    optimizer = optax.adam(0.1)
    init = {"w": jnp.zeros(3)}
    init_state = optimizer.init(init)
    seen = []

    def keep_references(step, params, opt_state, metrics):
        seen.append((step, params["w"], opt_state[0].mu["w"]))  # no copies

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(
            noisy_quadratic, init, optimizer, 6, batches(), opt_state=init_state,
            eval_fn=keep_references, eval_every=1, donate=donate,
            progress=False, return_result=True,
        )  # fmt: skip
    assert not [w for w in caught if "donated" in str(w.message)]
    # The caller's parameters and optimiser state are intact and usable.
    assert not init["w"].is_deleted() and not init_state[0].mu["w"].is_deleted()
    np.testing.assert_array_equal(init["w"] + 1.0, np.ones(3))
    # Every buffer handed to a later step was donated (updated in place);
    # the final parameters are returned, not donated.
    steps = [step for step, *_ in seen]
    assert steps == list(range(7))
    for step, w, mu in seen[:-1]:
        assert w.is_deleted() == donate and mu.is_deleted() == donate, step
    assert not seen[-1][1].is_deleted()
    assert not result.params["w"].is_deleted()


# ---------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------

POISONED = (3, 7)


def squared_error(params, key, batch):
    return jnp.sum((params["w"] - batch) ** 2), {}


def root_error(params, key, batch):
    """Finite loss, but the gradient of sqrt|w - x| is not finite at w = x."""
    return jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch))), {}


@pytest.mark.parametrize(
    "loss_fn, poison",
    [
        (squared_error, lambda w: jnp.full(3, jnp.nan)),  # NaN data: NaN loss
        (root_error, lambda w: w),  # finite loss, non-finite gradient
    ],
    ids=["nan-batch", "infinite-gradient"],
)
def test_non_finite_steps_leave_state_unchanged_and_are_counted(loss_fn, poison):
    states = {}

    def record(step, params, opt_state, metrics):
        states[step] = snapshot((params, opt_state))

    def data():
        for t in range(1, 11):
            w = states[t - 1][0]["w"]  # the parameters this step starts from
            yield poison(jnp.asarray(w)) if t in POISONED else jnp.full(3, t / 10)

    result = train(
        loss_fn, {"w": jnp.zeros(3)}, optax.adam(0.1), 10, data(),
        eval_fn=record, eval_every=1, progress=False, return_result=True,
    )  # fmt: skip
    assert result.skipped == len(POISONED)
    np.testing.assert_array_equal(
        result.history["skipped"], [int(t in POISONED) for t in range(1, 11)]
    )
    for t in range(1, 11):
        unchanged = leaves_equal(states[t], states[t - 1])
        assert unchanged == (t in POISONED), t
    assert np.all(np.isfinite(result.params["w"]))
    assert leaves_equal(result.params, states[10][0])


# ---------------------------------------------------------------------------
# History, evaluations and output modes
# ---------------------------------------------------------------------------


def test_history_is_arrays_with_compile_time_and_evaluations_every_k_steps():
    def evaluate(step, params, opt_state, metrics):
        return {"w": params["w"], "norm": jnp.linalg.norm(params["w"])}

    result = train(
        noisy_quadratic, {"w": jnp.zeros(3)}, optax.adam(0.1), 10, batches(),
        eval_fn=evaluate, eval_every=3, progress=False, return_result=True,
    )  # fmt: skip
    assert isinstance(result, TrainResult) and result.step == 10
    np.testing.assert_array_equal(result.history["step"], np.arange(1, 11))
    for name in ("loss", "distance", "skipped", "squared_grad_norm"):
        assert isinstance(result.history[name], np.ndarray)
        assert result.history[name].shape == (10,)
    (compile_seconds,) = result.history["compile_seconds"]
    assert 0 < compile_seconds < 60
    # Evaluated at the start, every third step and after the last step.
    np.testing.assert_array_equal(result.evaluations["step"], [0, 3, 6, 9, 10])
    assert result.evaluations["w"].shape == (5, 3)
    np.testing.assert_array_equal(result.evaluations["w"][0], np.zeros(3))
    np.testing.assert_array_equal(result.evaluations["w"][-1], result.params["w"])
    np.testing.assert_allclose(
        result.evaluations["norm"], np.linalg.norm(result.evaluations["w"], axis=1),
        rtol=1e-6,
    )  # fmt: skip


def test_quiet_mode_prints_nothing(capsys):
    train(noisy_quadratic, {"w": jnp.zeros(3)}, optax.adam(0.1), 10, batches(),
          log_every=1, progress=False)  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_log_mode_prints_a_line_every_log_every_steps(capsys):
    train(noisy_quadratic, {"w": jnp.zeros(3)}, optax.adam(0.1), 10, batches(),
          log_every=5, progress="log")  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].strip() for line in lines] == ["Step  5", "Step 10"]
    assert "| loss " in lines[0] and "| distance " in lines[0]


def conjugate_elbo(params, key, num_particles=16):
    """Negative ELBO of q(z) = N(loc, scale) for z ~ N(0, 1), y | z ~ N(z, 1)."""

    def target():
        with numpyro.plate("particles", num_particles):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=1.0)
        return (z,)

    def proposal():
        with numpyro.plate("particles", num_particles):
            scale = jnp.exp(params["log_scale"])
            return (numpyro.sample("z", dist.Normal(params["loc"], scale)),)

    program = coix.propose(target, proposal, loss_fn=coix.loss.elbo_loss)
    _, _, metrics = coix.traced_evaluate(program, seed=key)()
    return metrics["loss"], metrics


def test_progress_bar_shows_loss_ess_and_log_z(capsys):
    params = {"loc": jnp.zeros(()), "log_scale": jnp.zeros(())}
    train(conjugate_elbo, params, optax.adam(0.05), 20, log_every=10)
    err = capsys.readouterr().err
    assert "train" in err and "20/20" in err
    assert "loss=" in err and "ess=" in err and "log_Z=" in err


def test_bad_options_are_rejected():
    run = functools.partial(train, noisy_quadratic, {"w": jnp.zeros(3)},
                            optax.sgd(0.1), 2, batches())  # fmt: skip
    with pytest.raises(ValueError, match="progress"):
        run(progress="bar")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run(checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        run(eval_every=0, progress=False)


# ---------------------------------------------------------------------------
# Separate optimisers and separate losses for p and q
# ---------------------------------------------------------------------------


def cross_losses(params, key):
    """Each loss depends on both groups, so every cross-gradient is non-zero."""
    theta, phi = params["p"], params["q"]
    loss_p = jnp.sum((theta - 2.0 * phi) ** 2) + jnp.sum(theta**2)
    loss_q = jnp.sum((theta * phi - 1.0) ** 2)
    return {"p": loss_p, "q": loss_q}, {}


INIT_GROUPS = {"p": jnp.array([0.5, -1.0]), "q": jnp.array([1.5, 0.3])}


def optimizers():
    return {"p": optax.sgd(0.05, momentum=0.9), "q": optax.adam(0.1)}


def manual_group_updates(grad_fn, num_steps):
    """Each group stepped by its own optax optimiser, by hand."""
    opts = optimizers()

    @jax.jit
    def run(params):
        states = {g: opts[g].init(params[g]) for g in params}
        for _ in range(num_steps):
            grads = grad_fn(params)
            for g in params:
                updates, states[g] = opts[g].update(grads[g], states[g], params[g])
                params = {**params, g: optax.apply_updates(params[g], updates)}
        return params

    return run(dict(INIT_GROUPS))


def test_each_group_follows_the_gradient_of_its_own_loss():
    key = jax.random.key(0)
    cross = jax.grad(lambda p: cross_losses(p, key)[0]["q"])(INIT_GROUPS)["p"]
    assert np.all(np.abs(cross) > 0.1)  # loss q does pull on theta

    result = train(cross_losses, INIT_GROUPS, optimizers(), 6, progress=False,
                   return_result=True)  # fmt: skip

    def own_gradients(params):
        return {
            g: jax.grad(lambda x, g=g: cross_losses({**params, g: x}, key)[0][g])(
                params[g]
            )
            for g in params
        }

    def total_gradient(params):
        return jax.grad(lambda p: sum(cross_losses(p, key)[0].values()))(params)

    expected = manual_group_updates(own_gradients, 6)
    wrong = manual_group_updates(total_gradient, 6)
    for g in ("p", "q"):
        np.testing.assert_allclose(result.params[g], expected[g], rtol=1e-5)
        assert np.max(np.abs(result.params[g] - wrong[g])) > 1e-2
    # Each group's loss is reported, and "loss" is their sum.
    history = result.history
    np.testing.assert_allclose(
        history["loss"], history["loss_p"] + history["loss_q"], rtol=1e-6
    )


def test_group_optimizers_route_a_single_loss():
    def total(params, key):
        losses, metrics = cross_losses(params, key)
        return losses["p"] + losses["q"], metrics

    result = train(total, INIT_GROUPS, optimizers(), 6, progress=False,
                   return_result=True)  # fmt: skip
    grad = jax.grad(lambda p: total(p, jax.random.key(0))[0])
    expected = manual_group_updates(grad, 6)
    for g in ("p", "q"):
        np.testing.assert_allclose(result.params[g], expected[g], rtol=1e-5)


def test_group_names_must_match():
    with pytest.raises(ValueError, match="differ"):
        group_optimizers({"p": optax.sgd(0.1)}).init(INIT_GROUPS)

    def one_loss(params, key):
        return {"p": cross_losses(params, key)[0]["p"]}, {}

    with pytest.raises(ValueError, match="parameter groups"):
        train(one_loss, INIT_GROUPS, optax.sgd(0.1), 1, progress=False)
    step = make_step(one_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="parameter groups"):
        step(INIT_GROUPS, optax.sgd(0.1).init(INIT_GROUPS), jax.random.key(0))


# ---------------------------------------------------------------------------
# Flax linen, Flax NNX and plain pytrees reach a known optimum
# ---------------------------------------------------------------------------

W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)
B_TRUE = np.float32(0.3)
X = np.asarray(jax.random.normal(jax.random.key(11), (64, 3)))
Y = X @ W_TRUE + B_TRUE  # noise free: the least-squares optimum is (W_TRUE, B_TRUE)


def regression(kind):
    """``(init_params, predict(params, x), fitted(params) -> (w, b))``."""
    key = jax.random.key(12)
    if kind == "linen":
        module = nn.Dense(1)
        params = module.init(key, X[:1])
        return (
            params,
            lambda p, x: module.apply(p, x)[:, 0],
            lambda p: (p["params"]["kernel"][:, 0], p["params"]["bias"][0]),
        )
    if kind == "nnx":
        graphdef, params, rest = nnx.split(
            nnx.Linear(3, 1, rngs=nnx.Rngs(12)), nnx.Param, ...
        )

        def merged(p):
            return nnx.merge(graphdef, p, rest)

        return (
            params,
            lambda p, x: merged(p)(x)[:, 0],
            lambda p: (merged(p).kernel[...][:, 0], merged(p).bias[...][0]),
        )
    params = {"w": jax.random.normal(key, (3,)), "b": jnp.zeros(())}
    return params, lambda p, x: x @ p["w"] + p["b"], lambda p: (p["w"], p["b"])


@pytest.mark.parametrize("kind", ["linen", "nnx", "plain"])
def test_parameter_kinds_reach_the_least_squares_optimum(kind, tmp_path):
    init, predict, fitted = regression(kind)

    def loss_fn(params, key):
        return jnp.mean((predict(params, X) - Y) ** 2), {}

    # Two segments with a checkpoint between them, to cover saving each kind.
    first = train(loss_fn, init, optax.sgd(0.2), 100, progress=False,
                  checkpoint_dir=str(tmp_path), return_result=True)  # fmt: skip
    result = train(loss_fn, init, optax.sgd(0.2), 200, progress=False,
                   checkpoint_dir=str(tmp_path), return_result=True)  # fmt: skip
    assert first.step == 100 and result.step == 200 and result.skipped == 0
    w, b = fitted(result.params)
    np.testing.assert_allclose(w, W_TRUE, atol=1e-4)
    np.testing.assert_allclose(b, B_TRUE, atol=1e-4)
    w_init, _ = fitted(init)  # the caller's parameters are untouched
    assert not np.allclose(w_init, W_TRUE, atol=0.1)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def test_checkpoint_round_trip_is_exact_for_every_leaf_type(tmp_path):
    optimizer = group_optimizers({"p": optax.adam(0.1), "q": optax.sgd(0.1, 0.9)})
    nnx_state = nnx.split(nnx.Dropout(0.5, rngs=nnx.Rngs(3)))[1]  # holds a typed key
    tree = {
        "typed_key": jax.random.split(jax.random.key(7), 3),
        "raw_key": jax.random.PRNGKey(8),
        "half": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16),
        "count": jnp.arange(4, dtype=jnp.int32),
        "opt_state": optimizer.init(INIT_GROUPS),
        "nnx": nnx_state,
        "empty": {},
    }
    checkpoint.save(str(tmp_path), 5, tree, metadata={"note": "x", "a": np.ones(2)})
    saved = checkpoint.load(checkpoint.latest(str(tmp_path)))
    assert saved.step == 5 and saved.metadata["note"] == "x"
    assert leaves_equal(checkpoint.restore(saved, tree), tree)

    wrong_shape = {**tree, "count": jnp.arange(5, dtype=jnp.int32)}
    with pytest.raises(ValueError, match=r"\['count'\].*int32\[4\]"):
        checkpoint.restore(saved, wrong_shape)
    raw_for_typed = {**tree, "typed_key": jax.random.key_data(tree["typed_key"])}
    with pytest.raises(ValueError, match="typed PRNG key"):
        checkpoint.restore(saved, raw_for_typed)
    with pytest.raises(ValueError, match="leaves"):
        checkpoint.restore(saved, {"count": tree["count"]})


def test_checkpoint_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(str(tmp_path), step, {"x": jnp.full(2, step)}, keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_000000003.msgpack",
        "checkpoint_000000004.msgpack",
    ]
    assert checkpoint.latest(str(tmp_path)).endswith("4.msgpack")
    assert checkpoint.latest(str(tmp_path / "missing")) is None
    (tmp_path / "other").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint.load(str(tmp_path / "other"))


# The resumable run: two groups with their own optimisers and losses, a
# stochastic loss, a carried memory, a data stream and evaluations.
RESUME_STEPS = 6  # per segment


def memory_losses(params, key, batch, *, memory):
    theta, phi = params["p"]["w"], params["q"]["v"]
    noise = 0.1 * jax.random.normal(key, batch.shape)
    loss_p = jnp.sum((theta - batch - noise) ** 2) + jnp.sum(theta * phi)
    loss_q = jnp.sum((phi * theta - memory) ** 2)
    return {"p": loss_p, "q": loss_q}, {"memory": 0.9 * memory + 0.1 * theta}


def resumable_run(num_steps, directory, start=0):
    return train(
        memory_losses,
        {"p": {"w": jnp.zeros(3)}, "q": {"v": jnp.ones(3)}},
        {"p": optax.adam(0.05), "q": optax.chain(
            optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))},
        num_steps,
        batches(start),
        seed=jax.random.key(42),
        eval_fn=lambda step, params, opt_state, metrics: {"w": params["p"]["w"]},
        eval_every=2,
        checkpoint_dir=directory,
        checkpoint_every=4 if directory else None,
        progress=False,
        return_result=True,
        memory=jnp.zeros(3),
    )  # fmt: skip


def resume_in_this_process(directory, num_steps):
    """Continues the run saved in ``directory`` (the subprocess entry point)."""
    start = checkpoint.load(checkpoint.latest(directory)).step
    return resumable_run(num_steps, directory, start)


def assert_same_run(resumed, uninterrupted):
    assert leaves_equal(resumed.params, uninterrupted.params)
    assert leaves_equal(resumed.opt_state, uninterrupted.opt_state)
    assert resumed.step == uninterrupted.step
    assert resumed.skipped == uninterrupted.skipped
    per_step = set(uninterrupted.history) - {"compile_seconds"}
    assert set(resumed.history) - {"compile_seconds"} == per_step
    for name in per_step:
        assert leaves_equal(resumed.history[name], uninterrupted.history[name]), name
    assert leaves_equal(dict(resumed.evaluations), dict(uninterrupted.evaluations))


@pytest.fixture(scope="module")
def uninterrupted():
    return resumable_run(2 * RESUME_STEPS, None)


def test_resume_is_bit_for_bit(tmp_path, uninterrupted):
    first = resumable_run(RESUME_STEPS, str(tmp_path))
    assert first.step == RESUME_STEPS
    resumed = resume_in_this_process(str(tmp_path), 2 * RESUME_STEPS)
    assert_same_run(resumed, uninterrupted)
    assert leaves_equal(resumed.metrics, uninterrupted.metrics)  # memory included
    assert len(resumed.history["compile_seconds"]) == 2  # one per segment
    np.testing.assert_array_equal(
        uninterrupted.evaluations["step"], [0, 2, 4, 6, 8, 10, 12]
    )


def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path, uninterrupted):
    directory = str(tmp_path)
    resumable_run(RESUME_STEPS, directory)
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_train; "
        "test_train.resume_in_this_process(sys.argv[3], int(sys.argv[4]))"
    )
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "tests"), str(ROOT), directory,
         str(2 * RESUME_STEPS)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # quiet mode
    # Reopening the finished run trains no step and returns the saved state.
    reopened = resumable_run(2 * RESUME_STEPS, directory)
    assert reopened.metrics == {}
    assert_same_run(reopened, uninterrupted)


def test_resume_without_a_carried_keyword_raises(tmp_path):
    resumable_run(2, str(tmp_path))
    with pytest.raises(ValueError, match="memory"):
        train(memory_losses, {"p": {"w": jnp.zeros(3)}, "q": {"v": jnp.ones(3)}},
              optax.sgd(0.1), 4, batches(2), checkpoint_dir=str(tmp_path),
              progress=False)  # fmt: skip
