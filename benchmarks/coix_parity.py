r"""Coix parity: one Coix-style example, run under Coix and under this library.

The example's source (``programs/coix_examples/<name>.py``) names the
library on one line only, ``import combinators as coix``. This script runs
that source with the line kept (this library) or rewritten to ``import
coix`` (Coix, in an environment where Coix is installed), and saves the
loss and the gradient of the loss at the example's initial parameters for
``--seeds`` keys on one fixed batch. ``--compare A.npz B.npz`` then reports
the mean losses with standard errors, the cosine between the mean
gradients, and the fraction of gradient coordinates whose means differ by
more than 3 standard errors.

Usage::

    python benchmarks/coix_parity.py gmm --out ours.npz
    /path/to/coix-env/bin/python benchmarks/coix_parity.py gmm --library coix \\
        --out coix.npz
    python benchmarks/coix_parity.py --compare ours.npz coix.npz
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "programs" / "coix_examples"
IMPORT_LINE = "import combinators as coix"


def load_example(name: str, library: str) -> types.ModuleType:
    """The example module, importing ``library`` as ``coix``."""
    source = (EXAMPLES / f"{name}.py").read_text()
    if IMPORT_LINE not in source:
        raise SystemExit(f"{name}.py has no line {IMPORT_LINE!r}")
    if library == "coix":
        source = source.replace(IMPORT_LINE, "import coix")
    module = types.ModuleType(f"coix_example_{name}")
    module.__file__ = str(EXAMPLES / f"{name}.py")
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    if library == "coix":
        module.coix.set_backend("coix.numpyro")
    return module


def measure(name: str, library: str, seeds: int, overrides=()) -> dict:
    """Losses and flattened gradients at the example's initial parameters."""
    import jax

    module = load_example(name, library)
    params, batch, kwargs = module.parity_setup()
    for item in overrides:
        key, value = item.split("=")
        kwargs[key] = int(value)

    def loss(p, key):
        args = () if batch is None else (batch,)
        return module.loss_fn(p, key, *args, **kwargs)[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    losses, grads = [], []
    for seed in range(seeds):
        value, grad = value_and_grad(params, jax.random.PRNGKey(seed))
        losses.append(float(value))
        leaves = jax.tree_util.tree_leaves(grad)
        grads.append(np.concatenate([np.ravel(np.asarray(g)) for g in leaves]))
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    names = np.concatenate(
        [np.full(np.size(leaf), jax.tree_util.keystr(path)) for path, leaf in paths]
    )
    return {"loss": np.array(losses), "grad": np.stack(grads), "names": names}


def compare(a_path: str, b_path: str) -> str:
    """A text report comparing two saved measurements."""
    a, b = np.load(a_path), np.load(b_path)
    lines = []
    for label, data in ((a_path, a), (b_path, b)):
        n = len(data["loss"])
        lines.append(
            f"{label}: loss {data['loss'].mean():.4f} +- "
            f"{data['loss'].std(ddof=1) / np.sqrt(n):.4f} (n={n})"
        )
    ga, gb = a["grad"].mean(0), b["grad"].mean(0)
    cosine = float(ga @ gb / (np.linalg.norm(ga) * np.linalg.norm(gb)))
    se = np.sqrt(
        a["grad"].var(0, ddof=1) / len(a["grad"])
        + b["grad"].var(0, ddof=1) / len(b["grad"])
    )
    differ = np.abs(ga - gb) > 3 * np.maximum(se, 1e-12)
    ratio = float(np.linalg.norm(ga) / np.linalg.norm(gb))
    lines.append(
        f"mean gradients: cosine {cosine:.3f}, norm ratio {ratio:.3f}, "
        f"{differ.mean():.1%} of {differ.size} coordinates differ by > 3 SE"
    )
    if "names" in a:
        modules = np.array([n.split("']['")[1] for n in a["names"]])
        for module in sorted(set(modules)):
            mask = modules == module
            ca, cb = ga[mask], gb[mask]
            norm = np.linalg.norm(ca) * np.linalg.norm(cb)
            lines.append(
                f"  {module}: cosine {float(ca @ cb / norm):.3f}, norm ratio "
                f"{np.linalg.norm(ca) / np.linalg.norm(cb):.3f}, "
                f"{differ[mask].mean():.1%} of {mask.sum()} differ by > 3 SE"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="example: gmm, dmm or anneal")
    parser.add_argument(
        "--library", choices=("combinators", "coix"), default="combinators"
    )
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--out")
    parser.add_argument(
        "--set", action="append", default=[], help="override an integer option, k=v"
    )
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return
    result = measure(args.name, args.library, args.seeds, args.set)
    np.savez(args.out, **result)
    print(f"{args.library}: loss {result['loss'].mean():.4f}, saved {args.out}")


if __name__ == "__main__":
    main()
