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
"""

from __future__ import annotations

from types import ModuleType

from programs import vae_moons

__all__ = ["PROGRAMS"]

PROGRAMS: dict[str, ModuleType] = {
    "vae_moons": vae_moons,
}
