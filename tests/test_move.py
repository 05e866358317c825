"""MCMC moves and tempered SMC samplers against closed-form posteriors.

The model is conjugate and asymmetric: a location ``mu ~ N(0, 1)`` with one
observation ``y ~ N(mu, 1)``, and a precision ``tau ~ Gamma(2, 1)`` (a
positive, constrained latent) with five observations ``x_i ~ N(0,
tau^-1/2)``. The posterior is ``mu ~ N(y/2, 1/2)`` independent of ``tau ~
Gamma(2 + 5/2, 1 + sum x^2 / 2)``; the evidence is a normal times a
Student-t density.

A move acts on each particle alone, so particles started from exact
posterior draws stay independent exact draws: their means are tested at 4
standard errors of the closed-form sd (failure probability 6e-5 per
assertion) and their distribution by a KS test at level 1e-4, for any seed.
A kernel that forgets the log-Jacobian of the positive latent's
transform, or accepts with a sign error, moves ``tau``'s mean by many
standard errors. Evidence estimates are checked as ``E[Z-hat / Z] = 1``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.special
import scipy.stats

import combinators as coix
from combinators import algo, mcmc, tempering

NUM_SE = 4.0
X = np.array([0.5, -1.2, 2.0, 0.3, 1.1], np.float32)
Y = 1.5
A0, B0 = 2.0, 1.0
A_POST = A0 + X.size / 2
B_POST = B0 + 0.5 * float(np.sum(X**2))
MU_POST, SD_POST = Y / 2, np.sqrt(0.5)
LOG_Z = (
    scipy.stats.norm(0, np.sqrt(2)).logpdf(Y)
    - X.size / 2 * np.log(2 * np.pi)
    + A0 * np.log(B0)
    + scipy.special.gammaln(A_POST)
    - scipy.special.gammaln(A0)
    - A_POST * np.log(B_POST)
)
TAU_POST = scipy.stats.gamma(A_POST, scale=1 / B_POST)
MU_DIST = scipy.stats.norm(MU_POST, SD_POST)


def compile_once(fn):
    return jax.jit(
        fn,
        compiler_options={
            "xla_backend_optimization_level": 0,
            "xla_llvm_disable_expensive_passes": True,
        },
    )


def model(n):
    def p():
        with numpyro.plate("particles", n, dim=-2):
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            tau = numpyro.sample("tau", dist.Gamma(A0, B0))
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=Y)
            with numpyro.plate("data", X.size, dim=-1):
                numpyro.sample("x", dist.Normal(0.0, 1 / jnp.sqrt(tau)), obs=X)

    return p


def exact_posterior(n):
    def q():
        with numpyro.plate("particles", n, dim=-2):
            numpyro.sample("mu", dist.Normal(MU_POST, SD_POST))
            numpyro.sample("tau", dist.Gamma(A_POST, B_POST))

    return q


def assert_mean(draws, law, name):
    draws = np.ravel(draws)
    se = law.std() / np.sqrt(draws.size)
    assert abs(draws.mean() - law.mean()) < NUM_SE * se, (
        f"{name}: mean {draws.mean():.4f}, exact {law.mean():.4f}, se {se:.4f}"
    )


def assert_law(draws, law, name):
    assert_mean(draws, law, name)
    p_value = scipy.stats.kstest(np.ravel(draws), law.cdf).pvalue
    assert p_value > 1e-4, f"{name}: KS p-value {p_value:.2e}"


KERNELS = {
    "rwm": mcmc.rwm(),
    "mala": mcmc.mala(),
    "hmc": mcmc.hmc(num_leapfrog=3),
}


def blackjax_kernels():
    """BlackJAX's MALA, HMC and random walk, adapted as moves (two coordinates
    per particle: mu and log tau)."""
    blackjax = pytest.importorskip("blackjax")
    return {
        "blackjax_mala": mcmc.from_blackjax(lambda f, h: blackjax.mala(f, h)),
        "blackjax_hmc": mcmc.from_blackjax(
            lambda f, h: blackjax.hmc(f, h, jnp.ones(2), 3)
        ),
        "blackjax_rwm": mcmc.from_blackjax(
            lambda f, h: blackjax.additive_step_random_walk(
                f, blackjax.mcmc.random_walk.normal(h)
            ),
            default_step_size=lambda d: 2.38 / np.sqrt(d),
        ),
    }


BLACKJAX_KERNELS = ["blackjax_mala", "blackjax_hmc", "blackjax_rwm"]


@pytest.mark.parametrize("name", sorted(KERNELS) + BLACKJAX_KERNELS)
def test_kernel_leaves_the_posterior_invariant(name):
    """Exact posterior draws stay exact after five moves (mu and positive
    tau), for the built-in kernels and for BlackJAX's through the adapter,
    which runs one chain per particle on the population's log density."""
    n = 4000
    kernel = KERNELS[name] if name in KERNELS else blackjax_kernels()[name]
    program = coix.move(exact_posterior(n), model(n), kernel, num_steps=5)
    _, trace, metrics = compile_once(
        lambda key: coix.traced_evaluate(program, seed=key)()
    )(jax.random.key(3))
    assert_law(trace["mu"].value, MU_DIST, f"{name} mu")
    assert_law(trace["tau"].value, TAU_POST, f"{name} tau")
    # The particles moved: a kernel that always rejects would pass the
    # invariance checks trivially.
    assert 0.2 < float(metrics["accept_rate"]) < 1.0
    # Every particle runs its own chain: far more distinct values than a
    # population moved as one block (all accept or all reject) would keep.
    assert len(np.unique(np.asarray(trace["tau"].value))) > n // 2


def test_tempered_smc_with_a_blackjax_kernel_is_unbiased():
    """A BlackJAX HMC kernel as the move of tempered SMC, under vmap over
    runs, with its step size tuned between levels."""
    program = algo.tempered_smc(
        model(100),
        blackjax_kernels()["blackjax_hmc"],
        num_mcmc_steps=2,
        schedule=np.linspace(0, 1, 5),
        target_accept=0.6,
    )
    ratio, metrics = _evidence_ratio(program, num_runs=300, seed=8)
    assert_unbiased(ratio)
    accept = np.asarray(metrics["history"].records["accept_rate"])[:, 1:]
    assert np.all((accept > 0.05) & (accept <= 1.0))


def test_move_keeps_weights_and_rescores_the_target():
    """Weights (and log Z) unchanged; the trace holds p's log densities at
    the moved values."""
    n = 64
    prior = coix.propose(model(n), _prior(n))
    out, before, m0 = coix.traced_evaluate(prior, seed=jax.random.key(0))()
    assert np.ptp(np.asarray(m0.log_weight)) > 1.0  # weights that differ
    moved = coix.move(
        coix.empirical(out, before, m0), model(n), mcmc.rwm(), num_steps=2
    )
    _, after, m1 = compile_once(lambda key: coix.traced_evaluate(moved, seed=key)())(
        jax.random.key(1)
    )
    np.testing.assert_array_equal(m1.log_weight, m0.log_weight)
    np.testing.assert_array_equal(m1.log_Z, m0.log_Z)
    assert not np.allclose(after["tau"].value, before["tau"].value)
    tau = after["tau"].value
    np.testing.assert_allclose(
        after["tau"].log_prob,
        scipy.stats.gamma(A0, scale=1 / B0).logpdf(tau),
        rtol=1e-4,
    )


def _prior(n):
    def q():
        with numpyro.plate("particles", n, dim=-2):
            numpyro.sample("mu", dist.Normal(0.0, 1.0))
            numpyro.sample("tau", dist.Gamma(A0, B0))

    return q


def test_move_under_vmap_and_a_compiled_loop():
    """Moves inside fori_loop (rejuvenation repeated) under vmap over keys."""
    n = 256

    def body(_, q):
        return coix.move(q, model(n), mcmc.mala(), num_steps=1)

    # The initial program is a move too: a loop's carry keeps its metrics'
    # fields, and a move adds metrics["accept_rate"].
    init = body(0, coix.propose(model(n), exact_posterior(n)))
    program = coix.fori_loop(0, 3, body, init)
    runs = compile_once(
        jax.vmap(lambda key: coix.traced_evaluate(program, seed=key)()[1])
    )(jax.random.split(jax.random.key(5), 8))
    assert runs["tau"].value.shape == (8, n, 1)
    assert_law(runs["tau"].value, TAU_POST, "tau after 3 moves, 8 runs")


def _evidence_ratio(program, num_runs, seed):
    metrics = compile_once(
        jax.vmap(lambda key: coix.traced_evaluate(program, seed=key)()[2])
    )(jax.random.split(jax.random.key(seed), num_runs))
    return np.exp(np.asarray(metrics.log_Z, np.float64) - LOG_Z), metrics


def assert_unbiased(ratio):
    se = ratio.std() / np.sqrt(ratio.size)
    assert abs(ratio.mean() - 1.0) < NUM_SE * se, (ratio.mean(), se)
    assert se < 0.02


def test_tempered_smc_with_a_fixed_schedule_is_unbiased():
    """E[Z-hat] = Z for resample-move SMC on a fixed schedule (Del Moral,
    Doucet & Jasra 2006)."""
    program = algo.tempered_smc(
        model(100), mcmc.mala(), num_mcmc_steps=2, schedule=np.linspace(0, 1, 5)
    )
    ratio, metrics = _evidence_ratio(program, num_runs=300, seed=1)
    assert_unbiased(ratio)
    np.testing.assert_array_equal(metrics["num_levels"], 4)
    np.testing.assert_allclose(
        metrics["history"].records["beta"][0], np.linspace(0, 1, 5), atol=1e-6
    )


@pytest.mark.parametrize("criterion", ["ess", "cess"])
def test_adaptive_tempering_hits_its_target_and_the_evidence(criterion):
    """Every level but the last reaches the target fraction; the evidence
    and the posterior of both latents are right."""
    n = 200
    program = algo.tempered_smc(
        model(n),
        mcmc.rwm(),
        num_mcmc_steps=3,
        criterion=criterion,
        target_fraction=0.7,
    )
    ratio, metrics = _evidence_ratio(program, num_runs=200, seed=2)
    assert_unbiased(ratio)
    history = metrics["history"]
    levels = np.asarray(metrics["num_levels"])
    assert np.all(levels >= 2)
    for run in range(5):
        beta = np.asarray(history.records["beta"][run])[: levels[run] + 1]
        assert beta[0] == 0 and beta[-1] == 1 and np.all(np.diff(beta) > 0)
        if criterion == "ess":
            ess = np.asarray(history.ess[run])[1 : levels[run]]
            np.testing.assert_allclose(ess / n, 0.7, atol=0.01)


def test_tempered_smc_on_an_asymmetric_target_matches_quadrature():
    """Cauchy prior, one observation 2 with N(theta, 0.5^2) likelihood: the
    posterior sits on one side of the prior. A one-sided sign error in the
    tempering (BlackJAX #914) passes every symmetric test but not this one.
    Exact log Z and posterior mean by quadrature."""
    from scipy import integrate

    def joint(theta):
        return scipy.stats.cauchy.pdf(theta) * scipy.stats.norm.pdf(2.0, theta, 0.5)

    z, _ = integrate.quad(joint, -50, 50, points=[0.0, 2.0], limit=200)
    mean, _ = integrate.quad(lambda t: t * joint(t) / z, -50, 50, points=[0.0, 2.0])
    n = 256

    def cauchy_model():
        with numpyro.plate("particles", n):
            theta = numpyro.sample("theta", dist.Cauchy(0.0, 1.0))
            numpyro.sample("y", dist.Normal(theta, 0.5), obs=2.0)

    program = algo.tempered_smc(
        cauchy_model, mcmc.rwm(), num_mcmc_steps=3, criterion="cess"
    )
    traces, metrics = compile_once(
        jax.vmap(lambda key: coix.traced_evaluate(program, seed=key)()[1:])
    )(jax.random.split(jax.random.key(9), 200))
    ratio = np.exp(np.asarray(metrics.log_Z, np.float64) - np.log(z))
    assert_unbiased(ratio)
    # Posterior mean over all runs' particles: the runs are independent, so
    # the per-run means give the standard error.
    per_run = np.asarray(traces["theta"].value).mean(axis=1)
    se = per_run.std() / np.sqrt(per_run.size)
    assert abs(per_run.mean() - mean) < NUM_SE * se + 0.01 * abs(mean), (
        per_run.mean(),
        mean,
        se,
    )


def test_tempered_smc_particles_follow_the_posterior():
    n = 1000
    program = algo.tempered_smc(model(n), mcmc.hmc(num_leapfrog=3), num_mcmc_steps=3)
    _, trace, _ = compile_once(lambda key: coix.traced_evaluate(program, seed=key)())(
        jax.random.key(7)
    )
    # Resampled particles are not independent: test the means at a wider
    # tolerance (8 SE of independent draws) and the KS statistic loosely.
    for name, law in (("mu", MU_DIST), ("tau", TAU_POST)):
        draws = np.ravel(trace[name].value)
        se = law.std() / np.sqrt(n)
        assert abs(draws.mean() - law.mean()) < 8 * se, name
        assert scipy.stats.kstest(draws, law.cdf).statistic < 0.08, name


def rough_posterior(n):
    """A reference near, but not at, the posterior."""

    def q():
        with numpyro.plate("particles", n, dim=-2):
            numpyro.sample("mu", dist.Normal(MU_POST + 0.3, 1.2 * SD_POST))
            numpyro.sample("tau", dist.Gamma(A_POST / 2, B_POST / 2))

    return q


def test_geometric_path_from_a_reference_program():
    """``temper(p, beta, reference=q)`` = ``q^(1-beta) p^beta``. From a rough
    reference on a fixed schedule the evidence is unbiased; from the exact
    posterior the path is flat (``p / q = Z`` everywhere), so the adaptive
    schedule jumps to beta = 1 at once and Z-hat is exact."""
    n = 100
    program = algo.tempered_smc(
        model(n),
        mcmc.mala(),
        num_mcmc_steps=2,
        schedule=np.linspace(0, 1, 4),
        reference=rough_posterior(n),
    )
    ratio, _ = _evidence_ratio(program, num_runs=300, seed=10)
    assert_unbiased(ratio)
    exact = algo.tempered_smc(model(n), mcmc.mala(), reference=exact_posterior(n))
    _, metrics = _evidence_ratio(exact, num_runs=4, seed=10)
    np.testing.assert_array_equal(metrics["num_levels"], 1)
    np.testing.assert_allclose(metrics.log_Z, LOG_Z, rtol=1e-5)


def test_geometric_path_checks_the_reference_sites():
    def only_mu():
        with numpyro.plate("particles", 8, dim=-2):
            numpyro.sample("mu", dist.Normal(0.0, 1.0))

    program = coix.propose(coix.temper(model(8), 0.5, reference=only_mu), model(8))
    with pytest.raises(ValueError, match=r"temper: the reference must draw exactly"):
        coix.traced_evaluate(program, seed=jax.random.key(0))()


def test_waste_free_smc_is_unbiased_and_keeps_every_chain_state():
    """Dau & Chopin (2022): M = N / 5 ancestors, chains of 5 states; the
    evidence is unbiased and all N states follow the posterior."""
    program = algo.waste_free_smc(
        model, mcmc.mala(), num_particles=200, num_chains=40, num_mcmc_steps=1
    )
    ratio, _ = _evidence_ratio(program, num_runs=200, seed=6)
    assert_unbiased(ratio)
    _, trace, _ = compile_once(lambda key: coix.traced_evaluate(program, seed=key)())(
        jax.random.key(0)
    )
    assert trace["tau"].value.shape == (200, 1)
    # The chain states differ: a chain that never moved would repeat its
    # ancestor five times.
    assert len(np.unique(np.asarray(trace["tau"].value))) > 100


def test_step_size_is_tuned_towards_the_target_acceptance():
    """A far too small random-walk step accepts almost everything; tuning
    grows it level by level until the acceptance nears the target."""
    n = 200
    schedule = np.linspace(0, 1, 11)
    tuned, fixed = (
        algo.tempered_smc(
            model(n),
            mcmc.rwm(step_size=0.01),
            num_mcmc_steps=2,
            schedule=schedule,
            target_accept=target,
        )
        for target in (0.4, None)
    )
    _, _, m_tuned = compile_once(lambda k: coix.traced_evaluate(tuned, seed=k)())(
        jax.random.key(4)
    )
    _, _, m_fixed = compile_once(lambda k: coix.traced_evaluate(fixed, seed=k)())(
        jax.random.key(4)
    )
    step = np.asarray(m_tuned["history"].records["step_size"])
    accept = np.asarray(m_tuned["history"].records["accept_rate"])
    assert step[1] == pytest.approx(0.01)
    assert np.all(np.diff(step[1:]) > 0)  # acceptance stayed above 0.4
    assert accept[-1] < 0.9 < float(m_fixed["history"].records["accept_rate"][-1])
    np.testing.assert_allclose(m_fixed["history"].records["step_size"][1:], 0.01)


def test_same_key_gives_the_same_run_with_and_without_jit():
    """Eager and jitted evaluation agree for a move (built-in and BlackJAX
    kernels), for the geometric path from a reference, and for an adaptive
    tempered SMC run (its schedule and log Z)."""
    n = 64
    moved = coix.move(
        coix.propose(model(n), exact_posterior(n)), model(n), mcmc.hmc(num_leapfrog=3)
    )
    moved_blackjax = coix.move(
        coix.propose(model(n), exact_posterior(n)),
        model(n),
        blackjax_kernels()["blackjax_mala"],
        num_steps=3,
    )
    geometric = algo.tempered_smc(
        model(n), mcmc.mala(), schedule=[0.0, 0.5, 1.0], reference=rough_posterior(n)
    )
    tempered = algo.tempered_smc(model(n), mcmc.mala(), num_mcmc_steps=2)
    for program in (moved, moved_blackjax, geometric, tempered):

        def run(key, program=program):
            return coix.traced_evaluate(program, seed=key)()[1:]

        (eager_trace, eager), (jit_trace, jitted) = (
            run(jax.random.key(3)),
            jax.jit(run)(jax.random.key(3)),
        )
        np.testing.assert_allclose(
            eager_trace["tau"].value, jit_trace["tau"].value, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(eager.log_Z, jitted.log_Z, rtol=1e-5)
    np.testing.assert_allclose(
        eager["history"].records["beta"], jitted["history"].records["beta"], rtol=1e-5
    )


def test_next_beta_solves_the_ess_equation():
    """Bisection: ESS(beta') / N = target, and 1 when even beta' = 1 is fine."""
    loglik = jnp.asarray(np.random.default_rng(0).normal(0, 20, size=500))
    log_weight = jnp.zeros(500)
    beta = tempering.next_beta(log_weight, loglik, 0.0, 0.5)
    assert 0 < float(beta) < 1
    np.testing.assert_allclose(
        tempering.ess_fraction(log_weight, beta * loglik), 0.5, atol=1e-4
    )
    assert float(tempering.next_beta(log_weight, loglik * 1e-6, 0.0, 0.5)) == 1.0
    # CESS equals the ESS fraction when the current weights are uniform.
    np.testing.assert_allclose(
        tempering.cess_fraction(log_weight, 0.01 * loglik),
        tempering.ess_fraction(log_weight, 0.01 * loglik),
        rtol=1e-5,
    )


def test_move_errors_name_the_site():
    n = 8

    def discrete():
        with numpyro.plate("particles", n):
            numpyro.sample("k", dist.Poisson(3.0))

    with pytest.raises(ValueError, match=r"move: latent site 'k' is discrete"):
        coix.traced_evaluate(coix.move(discrete, discrete, mcmc.rwm()), seed=0)()

    def shared():
        numpyro.sample("g", dist.Normal(0.0, 1.0))
        with numpyro.plate("particles", n):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(
        ValueError, match=r"move: latent site 'g' .* without the particle axis"
    ):
        coix.traced_evaluate(coix.move(shared, shared, mcmc.rwm()), seed=0)()

    def fewer():
        with numpyro.plate("particles", n):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"move: the target samples latent site 'g'"):
        coix.traced_evaluate(coix.move(fewer, shared, mcmc.rwm()), seed=0)()
    with pytest.raises(TypeError, match=r"move: kernel must be an MCMCKernel"):
        coix.move(fewer, fewer, "rwm")
    with pytest.raises(ValueError, match=r"tempered_smc: schedule must be"):
        algo.tempered_smc(fewer, mcmc.rwm(), schedule=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"tempered_smc: target_accept must be"):
        algo.tempered_smc(fewer, mcmc.rwm(), target_accept=1.5)
    with pytest.raises(ValueError, match=r"waste_free_smc: num_chains must divide"):
        algo.waste_free_smc(lambda n: fewer, mcmc.rwm(), num_particles=10, num_chains=4)
    with pytest.raises(ValueError, match=r"tempered_smc: criterion must be"):
        algo.tempered_smc(fewer, mcmc.rwm(), criterion="ks")

    def mixture():
        with numpyro.plate("particles", n):
            k = numpyro.sample("k", dist.Categorical(probs=jnp.ones(3) / 3))
            numpyro.sample("y", dist.Normal(1.0 * k, 1.0), obs=1.0)

    with pytest.raises(ValueError, match=r"tempered_smc: latent sites \['k'\] are"):
        coix.traced_evaluate(algo.tempered_smc(mixture, mcmc.rwm()), seed=0)()
