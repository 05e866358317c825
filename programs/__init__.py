"""Reference programs: complete, runnable examples of the combinators.

Each program module exposes

* ``DESCRIPTION``: one line, shown by ``python -m programs --help``;
* ``run(*, steps, particles, seed, out, progress=True) -> dict``: trains and
  evaluates the program, writes its figure and a metrics JSON to ``out``,
  prints the final metrics and returns them as floats.

Run one with ``python -m programs <name> [--steps N] [--particles N]
[--seed S] [--out DIR] [--quiet]``.

Programs:
  vae_moons: the variational autoencoder of Kingma & Welling (2014),
    https://arxiv.org/abs/1312.6114, on the two-moons data, as
    ``propose(compose(decoder, prior), encoder, loss_fn=elbo_loss)``.
  annealing: annealed importance sampling / nested VI with learned forward
    and reverse kernels on an 8-mode ring and Neal's funnel.
  lgssm: bootstrap and guided particle filters on a linear-Gaussian
    state-space model, against the Kalman filter.
  gmm_apg: amortised population Gibbs on 2-D Gaussian mixtures.
  dmm: a deep Markov model on noisy rings trained with variational SMC.
  digits_vae: a Bernoulli VAE on binarised 8x8 digits (combinators.amortized).
  autoencoder: a deterministic autoencoder on the same digits (BCE loss).
  sbn: a sigmoid belief network (binary latents) trained with a choice of
    gradient estimators (``python -m programs sbn --estimator NAME``).
  stochastic_volatility: PMMH, particle Gibbs, FFBS and a learned proposal on
    a stochastic volatility model, against a fine-grid forward-backward.

Reproductions of published findings (tutorials/12_reproductions_*.ipynb):
  tighter_bounds: Rainforth et al. (2018) and DReG (Tucker et al. 2019): the
    signal-to-noise ratio of IWAE and DReG gradients against K on a 20-D
    Gaussian model, with closed-form checks.
  sbn_particles: Mnih & Rezende (2016): VIMCO vs multi-sample NVIL vs RWS on
    the digits SBN for K in {1, 2, 5, 10, 50}, exact held-out log p(x).
  aesmc_lgssm: AESMC/VSMC/FIVO vs IWAE (Le et al. 2018) learning a
    linear-Gaussian SSM, biased and score-gradient resampling gradients,
    against the Kalman filter.
  rws_gmm: Le et al. (2019)'s 20-component Gaussian mixture: wake-sleep,
    RWS, defensive RWS vs REINFORCE, VIMCO and Concrete as K grows.
  iwae_digits: Burda et al. (2016): IWAE vs VAE on 8x8 digits with dynamic
    binarisation, held-out k=5000 bound and active units.
"""

from __future__ import annotations

from types import ModuleType

from programs import (
    aesmc_lgssm,
    annealing,
    autoencoder,
    digits_vae,
    dmm,
    gmm_apg,
    iwae_digits,
    lgssm,
    rws_gmm,
    sbn,
    sbn_particles,
    stochastic_volatility,
    tighter_bounds,
    vae_moons,
)

__all__ = ["PROGRAMS"]

PROGRAMS: dict[str, ModuleType] = {
    "vae_moons": vae_moons,
    "annealing": annealing,
    "lgssm": lgssm,
    "gmm_apg": gmm_apg,
    "dmm": dmm,
    "digits_vae": digits_vae,
    "autoencoder": autoencoder,
    "sbn": sbn,
    "stochastic_volatility": stochastic_volatility,
    "tighter_bounds": tighter_bounds,
    "sbn_particles": sbn_particles,
    "aesmc_lgssm": aesmc_lgssm,
    "rws_gmm": rws_gmm,
    "iwae_digits": iwae_digits,
}
