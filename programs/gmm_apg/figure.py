"""The figure of the GMM program: clusterings per sweep and the curves."""

from __future__ import annotations

import itertools

import numpy as np

from combinators import plots
from programs.gmm_apg.model import NUM_CLUSTERS


def best_permutation(c_inferred, c_true):
    """The permutation ``perm`` maximising agreement of ``perm[c_inferred]``."""
    perms = np.asarray(list(itertools.permutations(range(NUM_CLUSTERS))))
    scores = [(perm[c_inferred] == c_true).mean() for perm in perms]
    return perms[int(np.argmax(scores))]


def plot(data, samples, sweeps, curves, losses, num_instances: int = 4):
    """The figure: instances coloured by inferred clusters per sweep, curves.

    Rows are test instances; columns show the highest-weight particle after
    each number of sweeps in ``sweeps`` (points coloured by its assignments,
    relabelled to best match the truth; crosses: its means; faint dots: the
    means of all particles; black stars: the true means). The last row shows
    accuracy and log joint against the number of sweeps and the training
    loss.

    Args:
      data: the test instances (the first ``num_instances`` are drawn).
      samples: ``{s: (mu, c, weights)}`` from ``evaluate``.
      sweeps: the sweep counts to show (keys of ``samples``).
      curves: ``{"sweeps": [...], "accuracy": [...], "log_joint": [...]}``,
        optionally with the same fields prefixed ``exact_`` (exact kernels
        after the learned initial proposal) and ``prior_`` (exact kernels
        from the prior), and ``reference_accuracy`` and
        ``reference_log_joint`` (horizontal lines: the nearest-true-mean
        accuracy and the log joint at the true latents).
      losses: training losses.
      num_instances: rows of scatter plots.

    Returns:
      A standalone matplotlib figure on the Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = plot_figure(Figure, data, samples, sweeps, curves, losses, num_instances)
    FigureCanvasAgg(fig)
    return fig


def plot_figure(
    figure_cls, data, samples, sweeps, curves, losses, num_instances: int = 4
):
    """Builds the figure of :func:`plot` with ``figure_cls`` (e.g. plt.figure)."""
    ncols = max(len(sweeps), 3)
    fig = figure_cls(
        figsize=(4 * ncols, 3.6 * (num_instances + 1)), layout="constrained"
    )
    axes = fig.subplots(num_instances + 1, ncols, squeeze=False)
    colors = np.array(["C0", "C1", "C2", "C3", "C4"])
    x, c_true, mu_true = (np.asarray(a) for a in data)
    for row in range(num_instances):
        for col, s in enumerate(sweeps):
            ax = axes[row, col]
            mu, c, w = (np.asarray(a) for a in samples[s])
            best = int(np.argmax(w[:, row]))
            perm = best_permutation(c[best, row], c_true[row])
            first = row == 0 and col == 0  # labels once, for the figure legend
            ax.scatter(
                *x[row].T,
                s=9,
                color=colors[perm[c[best, row]]],
                label="data, coloured by the inferred cluster" if first else None,
            )
            all_means = mu[:, row].reshape(-1, 2)
            ax.scatter(
                *all_means.T,
                s=4,
                color="0.5",
                alpha=0.3,
                label="means of every particle" if first else None,
            )
            for k in range(NUM_CLUSTERS):
                ax.scatter(
                    *mu[best, row, k],
                    marker="X",
                    s=110,
                    color=colors[perm[k]],
                    edgecolor="k",
                    label="means of the highest-weight particle"
                    if first and k == 0
                    else None,
                )
            ax.scatter(
                *mu_true[row].T,
                marker="*",
                s=90,
                color="k",
                label="true means" if first else None,
            )
            ax.set_title(
                f"instance {row}, {s} sweep{'s' if s != 1 else ''}", fontsize=9
            )
            ax.set_xlabel("$x_1$", fontsize=8)
            ax.set_ylabel("$x_2$", fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
        for col in range(len(sweeps), ncols):
            axes[row, col].axis("off")
    reference_labels = {
        "accuracy": "nearest true mean",
        "log_joint": "at the true latents",
    }
    variants = [
        ("", "APG, learned kernels", "o-"),
        ("exact_", "exact Gibbs kernels, learned q(mu | x)", "s--"),
        ("prior_", "exact Gibbs kernels, prior initialisation", "^:"),
    ]
    for ax, field, title in [
        (axes[-1, 0], "accuracy", "clustering accuracy (test)"),
        (axes[-1, 1], "log_joint", "log p(x, mu, c) per instance (test)"),
    ]:
        for prefix, label, style in variants:
            if prefix + field in curves:
                ax.plot(curves["sweeps"], curves[prefix + field], style, label=label)
        reference = curves.get(f"reference_{field}")
        if reference is not None:
            ax.axhline(
                reference, color="k", lw=0.8, ls="--", label=reference_labels[field]
            )
        ax.set_xlabel("sweeps")
        ax.set_ylabel(
            "fraction of points" if field == "accuracy" else "log p(x, mu, c)"
        )
        ax.set_title(title)
        ax.legend(fontsize=8)
    if "reference_log_joint" in curves:
        # Zoom on the learned sampler; exact Gibbs from the prior starts far below.
        top = max(curves["reference_log_joint"], *curves["log_joint"])
        axes[-1, 1].set_ylim(min(curves["log_joint"]) - 30.0, top + 5.0)
    ax = axes[-1, 2]
    losses = np.asarray(losses)
    plots.loss_curve(
        losses, ax=ax, window=max(1, len(losses) // 50), labels=["APG loss"]
    )
    ax.set_yscale("log")
    ax.set_ylabel("loss per instance")
    ax.set_title("training loss")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=4, fontsize=9)
    for col in range(3, ncols):
        axes[-1, col].axis("off")
    return fig
