r"""Coix's losses and ours on the very same traces, inside one Coix run.

Runs a Coix-style example (``programs/coix_examples``) under Coix, eagerly,
and wraps Coix's ``apg_loss`` and ``rws_loss`` in ``coix.algo`` so that
every call also evaluates this library's loss on the same Coix-format dict
traces (``combinators`` reads them, see ``combinators/core/coix_traces.py``).
It prints both values per call. Equal values mean that any difference the
parity check (``coix_parity.py``) finds comes from how the traces are
produced, not from the losses.

Needs Coix and this library importable by the same Python (same JAX and
NumPyro versions)::

    PYTHONPATH=/path/to/coix:. /path/to/coix-env/bin/python \
        benchmarks/coix_same_traces.py gmm --sweeps 2
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    """Runs the example under Coix and prints Coix's and our loss per call."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="example: gmm or dmm")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import coix.algo  # noqa: PLC0415 (Coix is an optional dependency)
    import coix_parity  # noqa: PLC0415

    from combinators import loss  # noqa: PLC0415

    records = []

    def both(name, theirs, ours):
        def loss_fn(q_trace, p_trace, w_in, w_inc, aggregate=True):
            value = theirs(q_trace, p_trace, w_in, w_inc, aggregate)
            records.append(
                (name, value, ours(q_trace, p_trace, w_in, w_inc, aggregate))
            )
            return value

        return loss_fn

    coix.algo.apg_loss = both("apg_loss", coix.algo.apg_loss, loss.apg_loss)
    coix.algo.rws_loss = both("rws_loss", coix.algo.rws_loss, loss.rws_loss)
    example = coix_parity.load_example(args.name, "coix")
    params, batch, options = example.parity_setup()
    options = {**options, "num_sweeps": args.sweeps}
    with jax.disable_jit():
        example.loss_fn(params, jax.random.PRNGKey(args.seed), batch, **options)
    print(f"{'loss':10s} {'Coix':>14s} {'ours':>14s}")
    for name, theirs, ours in records:
        print(f"{name:10s} {float(theirs):14.4f} {float(ours):14.4f}")


if __name__ == "__main__":
    main()
