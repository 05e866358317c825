"""The two-moons VAE training step, jitted and eager (tutorial style).

The model and networks are those of :mod:`programs.vae_moons`: a 2-D
latent ``z ~ N(0, I)``, the decoder likelihood ``x ~ N(decoder(z), I)``, the
encoder proposal ``q(z | x) = N(encoder(x), 0.01^2 I)``, each network
``Dense(32) - relu - Dense(2)``, one particle per data point of a minibatch
of 300, and Adam with learning rate 1e-2. The objective is the negative
ELBO averaged over the minibatch (reparameterised gradient). Every
implementation gets the same minibatches and the same initial parameters.
The minibatches are drawn once, as a data loader would give them (the
``dataloader`` argument of ``util.train``): :func:`programs.vae_moons.loss_fn`
draws its minibatch inside the step with ``jax.random.choice(...,
replace=False)``, which sorts all 10,000 indices and on CPU costs about
4 ms, some fifteen times the rest of the step, so it would hide every
difference between the implementations.

* ``hand``: the ELBO written out (Flax ``apply`` for the networks, the
  Gaussian log densities by hand) in :func:`steps.plain_step`;
* ``ours``: :func:`programs.vae_moons.program_metrics` (``propose(compose(
  decoder, prior), encoder, loss_fn=elbo_loss)``) in the library's
  training step (:func:`combinators.train.make_step`);
* ``ours (plain step)``: the same program in :func:`steps.plain_step`, to
  separate the program from the training step's extras;
* ``coix``: the same numpyro programs with Coix 0.1.0's ``propose``,
  ``compose`` and ``loss.elbo_loss``, in Coix's ``util.train`` step;
* ``numpyro``: ``numpyro.infer.SVI`` with ``Trace_ELBO`` on the same
  model and guide (parameters through one ``numpyro.param`` holding the
  Flax parameters; the plate is scaled by ``1/300`` so that the loss is the
  mean, as in the others), ``optax_to_numpyro(optax.adam(1e-2))``.

Quality: the test-set ELBO (3,000 points, one fixed key, one shared
evaluator) after all the steps, and the mean training loss of the last
tenth of the steps.

The eager workload runs the same losses without ``jax.jit``: ``hand``,
``ours`` and ``coix`` in the plain step a tutorial would write, plus the
libraries' own training steps un-jitted (``ours (train step)``: what
``combinators.util.train(jit_compile=False)`` runs; ``coix (util.train
step)``: what ``coix.util.train(jit_compile=False)`` runs), and NumPyro's
``svi.update`` un-jitted.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from benchmarks.harness import Case, Schedule, floats, installed, measure
from benchmarks.steps import MethodBinder, coix_style_step, library_step, plain_step
from programs import vae_moons as vm

__all__ = ["run", "run_eager"]

BATCH = 300
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _normal_log_prob(x, loc, scale):
    """``log N(x; loc, scale^2)`` summed over the last axis."""
    z = (x - loc) / scale
    return jnp.sum(-0.5 * z**2 - jnp.log(scale) - _HALF_LOG_2PI, axis=-1)


# ---------------------------------------------------------------------------
# The implementations' losses: loss(params, key, x) -> (loss, aux)
# ---------------------------------------------------------------------------


def hand_loss(params, key, x):
    """Negative mean ELBO of a minibatch, by hand."""
    net = MethodBinder(vm.VAE(), params)
    loc = net.encoder(x)
    z = loc + vm.ENCODER_SCALE * jax.random.normal(key, loc.shape)
    log_p = _normal_log_prob(z, 0.0, 1.0) + _normal_log_prob(x, net.decoder(z), 1.0)
    log_q = _normal_log_prob(z, loc, vm.ENCODER_SCALE)
    loss = -jnp.mean(log_p - log_q)
    return loss, loss


def ours_loss(params, key, x):
    """The library's VAE program (:func:`programs.vae_moons.program_metrics`)."""
    metrics = vm.program_metrics(params, key, x)
    return metrics["loss"], metrics


def coix_loss(params, key, x):
    """The same programs with Coix 0.1.0's combinators."""
    import coix

    network = coix.util.BindModule(vm.VAE(), params)
    n = x.shape[0]
    target = numpyro.plate("particle", n, dim=-1)(
        coix.compose(functools.partial(vm.decoder, network), vm.prior, suffix=False)
    )
    proposal = numpyro.plate("particle", n, dim=-1)(
        functools.partial(vm.encoder, network)
    )
    program = coix.propose(target, proposal, loss_fn=coix.loss.elbo_loss)
    _, _, metrics = coix.traced_evaluate(program, seed=key)(x)
    return metrics["loss"], metrics


def numpyro_svi(init_params, optimizer):
    """``SVI(model, guide, optimizer, Trace_ELBO())`` for the VAE."""
    from numpyro.infer import SVI, Trace_ELBO

    module = vm.VAE()

    def model(x):
        net = MethodBinder(module, numpyro.param("vae", init_params))
        with numpyro.plate("data", x.shape[0]):
            with numpyro.handlers.scale(scale=1.0 / x.shape[0]):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                numpyro.sample("x", dist.Normal(net.decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        net = MethodBinder(module, numpyro.param("vae", init_params))
        with numpyro.plate("data", x.shape[0]):
            with numpyro.handlers.scale(scale=1.0 / x.shape[0]):
                loc = net.encoder(x)
                numpyro.sample("z", dist.Normal(loc, vm.ENCODER_SCALE).to_event(1))

    return SVI(model, guide, numpyro.optim.optax_to_numpyro(optimizer), Trace_ELBO())


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


def _setup(total_steps: int, seed: int = 0):
    x_train, x_test = vm.load_data(seed)
    key_init, key_eval = jax.random.split(jax.random.key(seed))
    params = vm.VAE().init(key_init, x_train[:1])
    rng = np.random.default_rng(seed)
    index = np.stack(
        [rng.choice(x_train.shape[0], BATCH, replace=False) for _ in range(total_steps)]
    )
    batches = list(jnp.asarray(np.asarray(x_train)[index]))
    return params, batches, x_test, key_eval


def _quality(test_elbo, params_of, loss_of):
    def quality(state, auxes):
        losses = [loss_of(a) for a in auxes]
        tail = losses[-max(len(losses) // 10, 1) :]
        return {
            "test_elbo": test_elbo(params_of(state)),
            "train_loss_last_10pct": float(np.mean(floats(tail))),
        }

    return quality


def _cases(schedule: Schedule, *, jit: bool, with_coix: bool):
    """The implementations; jitted, or eager (tutorial-style plain steps first)."""
    params, batches, x_test, key_eval = _setup(schedule.total_steps)

    @jax.jit
    def test_elbo(params):
        return -hand_loss(params, key_eval, x_test)[0]

    optimizer = optax.adam(vm.LEARNING_RATE)
    state = (params, optimizer.init(params))
    first = lambda state: state[0]  # noqa: E731
    sources = ("/combinators/", "/programs/vae_moons.py", "/benchmarks/")

    def case(name, step, loss_of, note="", extra_sources=()):
        return Case(
            name,
            step,
            state,
            lambda i: (batches[i],),
            jit=jit,
            quality=_quality(test_elbo, first, loss_of),
            sources=sources + extra_sources,
            note=note,
        )

    as_loss = lambda aux: aux  # noqa: E731
    metrics_loss = lambda aux: aux["loss"]  # noqa: E731
    library = case(
        "ours" if jit else "ours (train step)",
        library_step(ours_loss, optimizer),
        metrics_loss,
        "combinators.train.make_step (the step util.train compiles)",
    )
    plain = case(
        "ours (plain step)" if jit else "ours",
        plain_step(ours_loss, optimizer),
        as_loss,
        "" if jit else "tutorial-style step: value_and_grad + optax",
    )
    cases = [case("hand", plain_step(hand_loss, optimizer), as_loss)]
    cases += [library, plain] if jit else [plain, library]
    if with_coix:
        coix_train = case(
            "coix" if jit else "coix (util.train step)",
            coix_style_step(coix_loss, optimizer),
            metrics_loss,
            "" if jit else "the step of coix.util.train(jit_compile=False)",
            ("/coix/",),
        )
        if jit:
            cases.append(coix_train)
        else:
            cases.append(
                case(
                    "coix",
                    plain_step(coix_loss, optimizer),
                    as_loss,
                    "tutorial-style step: value_and_grad + optax",
                    ("/coix/",),
                )
            )
            cases.append(coix_train)
    svi = numpyro_svi(params, optimizer)
    svi_state = svi.init(jax.random.key(1), batches[0])

    def svi_step(state, key, x):
        del key  # SVI splits the key held in its state
        return svi.update(state, x)

    cases.append(
        Case(
            "numpyro",
            svi_step,
            svi_state,
            lambda i: (batches[i],),
            jit=jit,
            quality=_quality(test_elbo, lambda s: svi.get_params(s)["vae"], as_loss),
            sources=sources + ("/numpyro/",),
            note="numpyro.infer.SVI(...).update + Trace_ELBO",
        )
    )
    return cases


DESCRIPTION = (
    "VAE on two moons (programs/vae_moons.py networks), minibatch = 300 "
    "particles, Adam 1e-2; quality: test ELBO (3,000 points) after all steps"
)
EAGER_DESCRIPTION = (
    "the same VAE step without jax.jit (tutorial style: value_and_grad + "
    "optax, op by op)"
)


def run(quick: bool, log=print, key=None) -> dict:
    """Times the jitted VAE training step of every implementation."""
    schedule = (
        Schedule(warmup=5, rounds=3, steps_per_round=20)
        if quick
        else Schedule(warmup=20, rounds=10, steps_per_round=50, compile_repeats=2)
    )
    cases = _cases(schedule, jit=True, with_coix=installed("coix"))
    results = measure(cases, schedule, jax.random.key(2) if key is None else key, log)
    return {
        "title": "VAE training step (jitted)",
        "description": DESCRIPTION,
        "schedule": schedule.__dict__,
        "groups": [{"label": "", "results": results}],
    }


def run_eager(quick: bool, log=print, key=None) -> dict:
    """Times the eager (un-jitted) VAE training step of every implementation."""
    schedule = (
        Schedule(warmup=1, rounds=2, steps_per_round=2)
        if quick
        else Schedule(warmup=2, rounds=5, steps_per_round=6)
    )
    cases = _cases(schedule, jit=False, with_coix=installed("coix"))
    results = measure(cases, schedule, jax.random.key(3) if key is None else key, log)
    return {
        "title": "VAE training step (eager, not jitted)",
        "description": EAGER_DESCRIPTION,
        "schedule": schedule.__dict__,
        "groups": [{"label": "", "results": results}],
    }
