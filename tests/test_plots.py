"""Figures drawn from what the library produces, checked artist by artist.

Inputs come from real runs: a bootstrap particle filter (``algo.smc`` with
adaptive resampling) on a Gaussian random walk, importance sampling with
``propose`` on conjugate Gaussian models (1-D and 2-D), a ``propose`` run
whose latent is a Bernoulli image, and ``util.train`` on a small ELBO. Each
figure is checked against a hand computation of what it should show (the
weighted histogram's bars are ``np.histogram`` with the normalised weights)
and saved to PNG.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax.scipy.stats import norm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.figure import Figure

import combinators as coix
from combinators import algo, loss, plots

KEY = jax.random.key(0)

# ---------------------------------------------------------------------------
# Library runs (module-scoped: computed once, read by several tests).
# ---------------------------------------------------------------------------

T, N_SMC = 12, 64
YS = jnp.asarray(np.cumsum(np.random.default_rng(0).normal(size=T)) * 1.5)


def step_target(t):
    def p(*previous):
        with numpyro.plate("particles", N_SMC):
            loc = previous[0] if previous else 0.0
            x = numpyro.sample("x", dist.Normal(loc, 1.0))
            numpyro.sample("y", dist.Normal(x, 1.0), obs=YS[t])
        return (x,)

    return p


def step_proposal(t):
    del t

    def k(*previous):
        with numpyro.plate("particles", N_SMC):
            loc = previous[0] if previous else 0.0
            return (numpyro.sample("x", dist.Normal(loc, 1.0)),)

    return k


@pytest.fixture(scope="module")
def smc_run():
    program = algo.smc(step_target, step_proposal, num_targets=T, ess_threshold=0.5)
    run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)()[2])
    metrics = run(KEY)
    return jax.device_get(metrics["history"]), metrics


Y_OBS, SIGMA = 1.3, 0.5
N_IS = 4000


def gaussian_target():
    with numpyro.plate("particles", N_IS):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, SIGMA), obs=Y_OBS)
    return (z,)


def gaussian_proposal():
    with numpyro.plate("particles", N_IS):
        return (numpyro.sample("z", dist.Normal(0.3, 1.2)),)


COV = jnp.array([[1.0, 0.6], [0.6, 0.8]])


def target_2d():
    with numpyro.plate("particles", N_IS):
        x = numpyro.sample("x", dist.MultivariateNormal(jnp.array([1.0, -1.0]), COV))
    return (x,)


def proposal_2d():
    with numpyro.plate("particles", N_IS):
        return (numpyro.sample("x", dist.Normal(jnp.zeros(2), 2.0).to_event(1)),)


@pytest.fixture(scope="module")
def is_runs():
    @jax.jit
    def run(key):
        key_1d, key_2d = jax.random.split(key)
        _, trace, metrics = coix.traced_evaluate(
            coix.propose(gaussian_target, gaussian_proposal), seed=key_1d
        )()
        _, trace_2d, metrics_2d = coix.traced_evaluate(
            coix.propose(target_2d, proposal_2d), seed=key_2d
        )()
        return (
            trace["z"].value,
            metrics.log_weight,
            trace_2d["x"].value,
            metrics_2d.log_weight,
        )

    return jax.device_get(run(KEY))


def savefig(ax, tmp_path, name):
    path = tmp_path / f"{name}.png"
    ax.figure.savefig(path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def softmax(log_weight):
    w = np.exp(log_weight - np.max(log_weight))
    return w / w.sum()


# ---------------------------------------------------------------------------
# Training curves.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_history():
    def loss_fn(params, key):
        def q():
            with numpyro.plate("particles", 16):
                return (numpyro.sample("z", dist.Normal(params["loc"], 1.0)),)

        def p():
            with numpyro.plate("particles", 16):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
                numpyro.sample("y", dist.Normal(z, SIGMA), obs=Y_OBS)
            return (z,)

        program = coix.propose(p, q, loss_fn=loss.elbo_loss)
        _, _, metrics = coix.traced_evaluate(program, seed=key)()
        return metrics["loss"], metrics

    result = coix.util.train(
        loss_fn,
        {"loc": jnp.zeros(())},
        optax.adam(0.1),
        40,
        progress=False,
        log_every=1000,
        return_result=True,
    )
    return result.history


def test_loss_curve_raw_smoothed_negated_and_logx(train_history, tmp_path):
    losses = np.asarray(train_history["loss"], np.float64)
    ax = plots.loss_curve(train_history)
    (line,) = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(losses) + 1))
    np.testing.assert_allclose(line.get_ydata(), losses)
    savefig(ax, tmp_path, "loss")

    ax = plots.loss_curve(train_history, window=5, negate=True, logx=True)
    raw, smooth = ax.lines
    np.testing.assert_allclose(raw.get_ydata(), -losses)
    np.testing.assert_allclose(
        smooth.get_ydata(),
        [-np.mean(losses[i : i + 5]) for i in range(len(losses) - 4)],
    )
    np.testing.assert_array_equal(smooth.get_xdata(), np.arange(5, len(losses) + 1))
    assert ax.get_xscale() == "log"

    ax = plots.loss_curve(train_history, keys=("loss", "ess"), labels=["loss", "ESS"])
    assert len(ax.lines) == 2 and ax.get_legend() is not None
    # An array works too, and the curve goes on the axes it is given.
    fig = Figure()
    FigureCanvasAgg(fig)
    given = fig.subplots()
    assert plots.loss_curve(losses, ax=given) is given and len(given.lines) == 1


def test_moving_average_skips_non_finite_steps():
    ax = plots.loss_curve(np.array([1.0, np.nan, 3.0, 5.0]), window=2)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [1.0, 3.0, 4.0])


# ---------------------------------------------------------------------------
# SMC diagnostics.
# ---------------------------------------------------------------------------


def test_smc_ess_marks_exactly_the_resampling_steps(smc_run, tmp_path):
    history, _ = smc_run
    ess, resampled = np.asarray(history.ess), np.asarray(history.resampled)
    assert ess.shape == (T,)  # the initial program, then T - 1 steps
    assert 0 < resampled.sum() < T - 1  # adaptive: some steps resample, some not
    ax = plots.smc_ess(history, num_particles=N_SMC)
    ess_line, n_line = ax.lines
    np.testing.assert_allclose(ess_line.get_ydata(), ess)
    np.testing.assert_allclose(n_line.get_ydata(), [N_SMC, N_SMC])
    (marks,) = ax.collections
    np.testing.assert_allclose(
        marks.get_offsets(), np.stack([np.flatnonzero(resampled), ess[resampled]], 1)
    )
    savefig(ax, tmp_path, "ess")
    relative = plots.smc_ess(history, num_particles=N_SMC, relative=True)
    np.testing.assert_allclose(relative.lines[0].get_ydata(), ess / N_SMC)


def test_smc_log_z_running_increments_and_reference(smc_run, tmp_path):
    history, metrics = smc_run
    ax = plots.smc_log_Z(history, reference=-20.0)
    running, reference = ax.lines
    np.testing.assert_allclose(running.get_ydata(), history.log_Z)
    np.testing.assert_allclose(running.get_ydata()[-1], metrics["log_Z"], rtol=1e-6)
    np.testing.assert_allclose(reference.get_ydata(), [-20.0, -20.0])
    bars = plots.smc_log_Z(history, increments=True)
    heights = [patch.get_height() for patch in bars.patches]
    np.testing.assert_allclose(heights, history.log_Z_increment, rtol=1e-6)
    np.testing.assert_allclose(np.sum(heights), history.log_Z[-1], rtol=1e-4)
    # The metrics record holding the history works as well.
    ess_ax, log_z_ax = plots.smc_history(metrics, num_particles=N_SMC)
    assert ess_ax.figure is log_z_ax.figure and len(log_z_ax.lines) == 1
    savefig(ess_ax, tmp_path, "smc")


def test_smc_ess_threshold_line_and_log_z_error_against_a_reference(smc_run):
    history, _ = smc_run
    ax = plots.smc_ess(history, num_particles=N_SMC, threshold=0.5)
    _, n_line, threshold_line = ax.lines
    np.testing.assert_allclose(threshold_line.get_ydata(), [N_SMC / 2, N_SMC / 2])
    assert "threshold" in threshold_line.get_label()
    relative = plots.smc_ess(history, num_particles=N_SMC, relative=True, threshold=0.5)
    np.testing.assert_allclose(relative.lines[2].get_ydata(), [0.5, 0.5])
    with pytest.raises(ValueError, match="threshold needs num_particles"):
        plots.smc_ess(history, threshold=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        plots.smc_ess(history, num_particles=N_SMC, threshold=2.0)

    # The error against a per-step reference is the estimate minus it.
    reference = np.asarray(history.log_Z) - np.linspace(0.0, 1.0, T)
    ax = plots.smc_log_Z(history, reference=reference, error=True)
    error_line, zero_line = ax.lines
    np.testing.assert_allclose(error_line.get_ydata(), np.linspace(0, 1, T), atol=1e-5)
    np.testing.assert_allclose(zero_line.get_ydata(), [0.0, 0.0])
    assert ax.get_ylabel() == "log Z estimate - exact"
    scalar = plots.smc_log_Z(history, reference=-20.0, error=True)
    np.testing.assert_allclose(
        scalar.lines[0].get_ydata(), np.asarray(history.log_Z) + 20.0, rtol=1e-6
    )
    with pytest.raises(ValueError, match="error=True needs the reference"):
        plots.smc_log_Z(history, error=True)


def test_stacked_histories_of_several_runs_are_refused(smc_run):
    history, _ = smc_run
    stacked = jax.tree_util.tree_map(lambda x: np.stack([x, x]), history)
    with pytest.raises(ValueError, match="plot one run"):
        plots.smc_ess(stacked)


# ---------------------------------------------------------------------------
# Weighted particles.
# ---------------------------------------------------------------------------


def test_weighted_hist_bars_are_normalised_weights_per_bin(is_runs, tmp_path):
    z, log_weight = np.asarray(is_runs[0], np.float64), is_runs[1]
    w = softmax(np.asarray(log_weight, np.float64))
    full = (z.min(), z.max())
    mass, edges = np.histogram(z, bins=30, range=full, weights=w)

    ax = plots.weighted_hist(z, log_weight, bins=30, range=full, density=False)
    bars = ax.patches
    assert len(bars) == 30
    np.testing.assert_allclose(
        [b.get_height() for b in bars], mass, rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose([b.get_x() for b in bars], edges[:-1])
    np.testing.assert_allclose(sum(b.get_height() for b in bars), 1.0, rtol=1e-6)

    post_var = SIGMA**2 / (1 + SIGMA**2)
    post_mean = Y_OBS / (1 + SIGMA**2)

    def log_posterior(x):
        return norm.logpdf(x, post_mean, np.sqrt(post_var))

    ax = plots.weighted_hist(
        z, log_weight, bins=30, range=full, log_density=log_posterior
    )
    heights = np.array([b.get_height() for b in ax.patches])
    np.testing.assert_allclose(heights, mass / np.diff(edges), rtol=1e-6, atol=1e-12)
    (curve,) = ax.lines
    np.testing.assert_allclose(
        curve.get_ydata(), np.exp(log_posterior(curve.get_xdata())), rtol=1e-5
    )
    savefig(ax, tmp_path, "hist")
    # The unnormalised log density (prior x likelihood) normalised on the grid
    # draws the same curve up to the trapezoid rule's error.
    ax = plots.weighted_hist(
        z,
        log_weight,
        bins=30,
        range=full,
        log_density=lambda x: norm.logpdf(x) + norm.logpdf(Y_OBS, x, SIGMA),
        normalize_density=True,
    )
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curve.get_ydata(), atol=1e-3)
    # Equal weights (e.g. after resampling) when no log weights are given.
    uniform = plots.weighted_hist(z, bins=edges, density=False)
    counts = np.histogram(z, bins=edges)[0] / len(z)
    np.testing.assert_allclose([b.get_height() for b in uniform.patches], counts)
    # By default the bins span the particles with a visible weight (at least
    # a thousandth of a uniform weight); less than 0.1% of the mass is left out.
    default = plots.weighted_hist(z, log_weight, bins=30, density=False)
    low, high = (
        default.patches[0].get_x(),
        default.patches[-1].get_x() + default.patches[-1].get_width(),
    )
    visible = z[w >= 1e-3 / len(z)]
    np.testing.assert_allclose([low, high], [visible.min(), visible.max()], rtol=1e-6)
    assert 0.999 < sum(b.get_height() for b in default.patches) <= 1.0 + 1e-9


def test_weighted_hist_refuses_columns_and_mismatched_sizes(is_runs):
    z, log_weight = is_runs[0], is_runs[1]
    with pytest.raises(ValueError, match="several columns"):
        plots.weighted_hist(z, np.zeros((len(z), 3)))
    with pytest.raises(ValueError, match="weights"):
        plots.weighted_hist(z[:10], log_weight)
    with pytest.raises(ValueError, match="-inf"):
        plots.weighted_hist(z, np.full(len(z), -np.inf))


def test_weighted_hist2d_and_hexbin_hold_the_weights(is_runs, tmp_path):
    x, log_weight = is_runs[2], is_runs[3]
    w = softmax(np.asarray(log_weight, np.float64))
    box = ((-3.0, 5.0), (-5.0, 3.0))
    expected = np.histogram2d(x[:, 0], x[:, 1], bins=20, range=box, weights=w)[0]

    precision = np.linalg.inv(np.asarray(COV, np.float64))

    def log_density(xy):  # the target's log density up to a constant
        d = xy - np.array([1.0, -1.0])
        return -0.5 * np.einsum("gi,ij,gj->g", d, precision, d)

    ax = plots.weighted_hist2d(
        x, log_weight, bins=20, range=box, log_density=log_density
    )
    mesh, contours = ax.collections
    assert isinstance(mesh, QuadMesh)
    np.testing.assert_allclose(mesh.get_array().reshape(20, 20), expected.T, rtol=1e-6)
    assert len(contours.levels) == 3
    savefig(ax, tmp_path, "hist2d")

    ax = plots.weighted_hist2d(x, log_weight, kind="hexbin", bins=15)
    (hexes,) = ax.collections
    assert isinstance(hexes, PolyCollection)
    # The default range holds every point: the hexagons hold all the mass.
    np.testing.assert_allclose(np.sum(hexes.get_array()), 1.0, rtol=1e-5)
    savefig(ax, tmp_path, "hexbin")
    with pytest.raises(ValueError, match="kind"):
        plots.weighted_hist2d(x, log_weight, kind="scatter")


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


def test_image_grid_places_samples_row_by_row(tmp_path):
    def pixels():
        with numpyro.plate("particles", 7):
            probs = jnp.linspace(0.1, 0.9, 48)
            return (numpyro.sample("x", dist.Bernoulli(probs).to_event(1)),)

    (flat,), _, _ = jax.jit(lambda key: coix.traced_evaluate(pixels, seed=key)())(KEY)
    flat = np.asarray(flat, np.float64)
    images = flat.reshape(7, 6, 8)
    ax = plots.image_grid(flat, shape=(6, 8), ncols=3, pad=1, vmin=0.0, vmax=1.0)
    (image,) = ax.images
    mosaic = np.ma.filled(image.get_array(), np.nan)
    assert mosaic.shape == (3 * 6 + 2, 3 * 8 + 2)
    for index in range(7):
        row, col = divmod(index, 3)
        block = mosaic[row * 7 : row * 7 + 6, col * 9 : col * 9 + 8]
        np.testing.assert_array_equal(block, images[index])
    assert np.isnan(mosaic[6]).all() and np.isnan(mosaic[-6:, -8:]).all()  # gaps
    savefig(ax, tmp_path, "grid")
    # (n, h, w) input needs no shape and draws the same grid.
    same = plots.image_grid(images, ncols=3, vmin=0.0, vmax=1.0).images[0]
    np.testing.assert_array_equal(np.ma.filled(same.get_array(), np.nan), mosaic)
    with pytest.raises(ValueError, match="shape="):
        plots.image_grid(flat)

    recon = plots.reconstructions(flat, 1.0 - flat, shape=(6, 8), max_images=4)
    grid = np.ma.filled(recon.images[0].get_array(), np.nan)
    assert grid.shape == (2 * 6 + 1, 4 * 8 + 3)
    np.testing.assert_array_equal(grid[7:, :8], 1.0 - images[0])
    assert [t.get_text() for t in recon.get_yticklabels()] == ["data", "reconstruction"]
    savefig(recon, tmp_path, "reconstructions")


def test_no_pyplot_figures_are_left_behind(is_runs):
    before = (
        sys.modules["matplotlib.pyplot"].get_fignums()
        if "matplotlib.pyplot" in sys.modules
        else []
    )
    plots.weighted_hist(is_runs[0], is_runs[1])
    after = (
        sys.modules["matplotlib.pyplot"].get_fignums()
        if "matplotlib.pyplot" in sys.modules
        else []
    )
    assert after == before
