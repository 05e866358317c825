"""The annealing program's four-panel figure."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from programs._report import axes
from programs.annealing.targets import get_target


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(target: str, initial: np.ndarray, final: np.ndarray, run, num_particles: int):
    """Samples of ``pi_0``, final particles, log Z and ESS during training.

    Args:
      target: the target's name.
      initial: samples of ``pi_0``, shape ``(n, dim)``.
      final: the final particles resampled by weight, shape ``(n, dim)``.
      run: the :class:`~programs.annealing.experiment.TrainingRun`.
      num_particles: particles per training step.

    Returns:
      The four axes.
    """
    spec = get_target(target)
    ax = axes((18, 4.2), ncols=4)
    columns = (0, 1) if spec.dim == 2 else (1, 0)
    labels = ("x1", "x2") if spec.dim == 2 else ("x_1", "v")
    limit = 16.0 if spec.dim == 2 else 12.0
    if spec.dim == 2:
        axis = np.linspace(-limit, limit, 300)
        xx, yy = np.meshgrid(axis, axis)
        grid = jnp.asarray(np.stack([xx, yy], axis=-1), jnp.float32)
        density = np.exp(np.asarray(spec.log_density(grid)))
    for panel, points, title, color in [
        (ax[0], initial, "samples of the initial density $\\pi_0$", "C0"),
        (ax[1], final, "final particles (resampled by weight)", "C2"),
    ]:
        if spec.dim == 2:
            levels = density.max() * np.array([0.05, 0.3, 0.7])
            panel.contour(xx, yy, density, levels=levels, colors="0.5", linewidths=0.6)
        panel.scatter(
            points[:, columns[0]], points[:, columns[1]], s=1.5, alpha=0.3, color=color
        )
        panel.set_xlim(-limit, limit)
        panel.set_ylim(-limit, limit)
        panel.set_aspect("equal")
        panel.set_xlabel(labels[0])
        panel.set_ylabel(labels[1])
        panel.set_title(title)

    steps = np.arange(1, len(run.history["loss"]) + 1)
    width = max(len(steps) // 100, 1)
    smooth_steps = steps[width - 1 :]
    ev = run.evaluations
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "frameon": False}
    ax[2].plot(steps, run.history["log_Z"], lw=0.4, color="C1", alpha=0.25)
    ax[2].plot(
        smooth_steps,
        _smooth(run.history["log_Z"], width),
        lw=0.8,
        color="C1",
        label=f"training runs ({num_particles} particles; raw faint, mean of {width})",
    )
    ax[2].plot(ev["step"], ev["log_Z"], "o-", ms=3, color="C3", label="evaluation runs")
    ax[2].axhline(spec.log_Z, color="k", ls="--", lw=0.8, label="true log Z")
    ax[2].set_title("log Z estimate during training")
    ax[2].set_xlabel("training step")
    ax[2].set_ylabel("log Z estimate")
    ax[2].legend(fontsize=8, **below)
    ess_fraction = np.asarray(run.history["ess"]) / num_particles
    ax[3].plot(steps, ess_fraction, lw=0.4, color="C1", alpha=0.25)
    ax[3].plot(
        smooth_steps,
        _smooth(ess_fraction, width),
        lw=0.8,
        color="C1",
        label=f"training runs (raw faint, mean of {width})",
    )
    ax[3].plot(
        ev["step"], ev["ess_fraction"], "o-", ms=3, color="C3", label="evaluation runs"
    )
    ax[3].set_ylim(0, 1.02)
    ax[3].set_title("ESS / N of the last level during training")
    ax[3].set_xlabel("training step")
    ax[3].set_ylabel("ESS / N")
    ax[3].legend(fontsize=8, **below)
    return ax
