"""Tempering paths between densities: ``temper``.

``temper(p, beta)`` raises ``p``'s likelihood to the power ``beta`` (the
path from the prior to the posterior); ``temper(p, beta, reference=q)`` is
the geometric path ``q^(1 - beta) * p^beta`` from a reference program ``q``
(e.g. a fitted Gaussian approximation) to ``p``'s joint density. Both are
targets: their density is what a sequential sampler reweighs by and what
an MCMC move leaves invariant (Neal 2001; Del Moral, Doucet & Jasra 2006;
Gelman & Meng 1998 on paths between two densities).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpyro
from numpyro.primitives import Messenger

from combinators.core import evaluate, messages

__all__ = ["REFERENCE_SUFFIX", "temper"]

#: The factor site ``temper(p, beta, reference=q)`` adds for each latent
#: site ``x`` of ``q`` is named ``x + REFERENCE_SUFFIX``.
REFERENCE_SUFFIX = "@reference"


class _Scale(Messenger):
    """Multiplies the log density of fresh sample sites by ``beta``.

    Only observed sites are scaled unless ``latent`` is set.
    """

    def __init__(self, fn, beta, latent: bool):
        self.beta = beta
        self.latent = latent
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        if not (self.latent or msg.get("is_observed", False)):
            return
        if messages.replayed_site(msg) is not None:
            return
        scale = msg.get("scale")
        msg["scale"] = self.beta if scale is None else self.beta * scale


class _LatentValues(Messenger):
    """Records the value of every latent sample site a program draws."""

    def __init__(self, values: dict):
        self.values = values
        super().__init__()

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and not msg.get("is_observed", False):
            self.values[msg["name"]] = msg["value"]


def _geometric(program: Callable, reference: Callable, beta) -> Callable:
    """``reference^(1 - beta) * program^beta``; see :func:`temper`."""
    where = "temper"
    evaluate.check_callable(where, program=program, reference=reference)

    def tempered(*args, **kwargs):
        values: dict = {}
        with _LatentValues(values):
            out = _Scale(program, beta, latent=True)(*args, **kwargs)
        ref = evaluate.evaluate(
            reference, {(n, 0): v for n, v in values.items()}, where=where
        )(*args, **kwargs)
        ref_trace = ref.trace.marginal()
        ref_latents = {n for n, s in ref_trace.items() if not s.observed}
        extra = sorted(n for n in ref_latents if (n, 0) not in ref.substituted)
        observed = sorted(n for n, s in ref_trace.items() if s.observed)
        if extra or observed or ref_latents != set(values):
            raise ValueError(
                f"{where}: the reference must draw exactly the target's latent "
                f"sites and observe nothing; target latents {sorted(values)}, "
                f"reference latents {sorted(ref_latents)}"
                + (f", reference observes {observed}" if observed else "")
                + "."
            )
        for name in sorted(ref_latents):
            site = ref_trace[name]
            with contextlib.ExitStack() as stack:
                for plate in site.plates:
                    stack.enter_context(
                        numpyro.plate(plate.name, plate.size, dim=plate.dim)
                    )
                numpyro.factor(name + REFERENCE_SUFFIX, (1.0 - beta) * site.log_prob)
        return out

    return tempered


def temper(program: Callable, beta, reference: Callable | None = None) -> Callable:
    """A program on a tempering path; ``beta`` may be a traced array.

    Without ``reference``: every observed site's log density is multiplied
    by ``beta`` (latent sites are untouched), so the density is ``prior(z) *
    likelihood(x | z)^beta``: the prior at ``beta = 0``, the posterior's
    unnormalised density at ``beta = 1`` (Neal 2001, "Annealed importance
    sampling"; Del Moral, Doucet & Jasra 2006, "Sequential Monte Carlo
    samplers").

    With ``reference=q``: the geometric path ``q(z)^(1 - beta) * p(z,
    x)^beta`` from a normalised reference ``q`` (which draws exactly ``p``'s
    latent sites, in the same plates, and observes nothing) to ``p``'s joint
    density: every site of ``p`` is scaled by ``beta`` and, for each latent
    ``x`` of ``q``, an observed factor site ``x@reference`` adds ``(1 -
    beta) log q(x | ...)``. A reference close to the posterior (a Laplace or
    variational fit) shortens the path. The program is a target: latents
    it is not given are drawn as ``p`` draws them, not from ``q``.

    Args:
      program: a program with observed sites.
      beta: the inverse temperature.
      reference: an optional reference program for the geometric path.

    Returns:
      The tempered program.

    Raises:
      ValueError: when the program runs, if the reference's latent sites are
        not exactly the target's or it observes a site.
    """
    if reference is None:
        return _Scale(program, beta, latent=False)
    return _geometric(program, reference, beta)
