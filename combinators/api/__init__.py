"""The combinators: functions from programs to programs, one family per file.

``compose``, ``extend``, ``propose`` and ``resample`` follow the grammar of
inference combinators (Stites, Zimmermann, Wu, Sennesh & van de Meent, 2021,
"Learning Proposals for Probabilistic Programs with Inference Combinators",
https://arxiv.org/abs/2103.00668) and Coix's signatures. Each returns a
program, so they nest: ``propose(p, compose(k, resample(propose(p0, q))))``.

Semantics of the weights (with ``p`` the target, ``q`` the proposal):

* ``propose(p, q)`` runs ``q``, scores its latent values under ``p`` and
  returns ``p``'s sites with log weight
  ``w = w_in + log p(sites of p that q gave, observed) - log q(all q sites)``
  where ``w_in`` is ``q``'s own weight. Latents only in ``p`` are drawn from
  ``p`` and cancel.
* ``move(q, p, kernel)`` moves each particle of ``q`` with an MCMC
  kernel that leaves ``p`` invariant; weights unchanged.
* ``resample(q)`` draws ancestors proportional to the weights; every new
  particle carries ``log Z-hat`` of the incoming weights, so the log Z
  estimate is unchanged, also when the number of particles changes.
"""

from combinators.api._compose import compose, extend, newest
from combinators.api._loops import fori_loop, scan
from combinators.api._memoize import memoize
from combinators.api._move import move
from combinators.api._propose import propose
from combinators.api._resample import resample

__all__ = [
    "compose",
    "extend",
    "fori_loop",
    "memoize",
    "move",
    "newest",
    "propose",
    "resample",
    "scan",
]
