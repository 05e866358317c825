"""Command line: ``python -m programs <name> [options]``.

``python -m programs --help`` lists the programs with their descriptions.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from programs import PROGRAMS


def _defaults(module) -> str:
    """The program's own defaults for --steps and --particles, as text."""
    parameters = inspect.signature(module.run).parameters
    shown = []
    for option in ("steps", "particles"):
        parameter = parameters.get(option)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            shown.append(f"--{option} {parameter.default}")
    return " ".join(shown)


def _epilog() -> str:
    width = max(len(name) for name in PROGRAMS)
    lines = ["programs:"]
    for name, module in PROGRAMS.items():
        lines.append(f"  {name:<{width}}  {module.DESCRIPTION}")
        defaults = _defaults(module)
        if defaults:
            lines.append(f"  {'':<{width}}  (defaults: {defaults})")
    lines.append("")
    lines.append("example: python -m programs vae_moons --steps 200 --out out")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its epilog lists every program."""
    parser = argparse.ArgumentParser(
        prog="python -m programs",
        description="Run a reference program of the combinators library.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", metavar="NAME", help="the program to run (listed below)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the program's own)",
    )
    parser.add_argument(
        "--particles",
        type=int,
        default=None,
        help="number of particles (default: the program's own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (final metrics are still printed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, runs the named program and returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name not in PROGRAMS:
        parser.error(
            f"unknown program {args.name!r}; available: {', '.join(sorted(PROGRAMS))}"
        )
    for option in ("steps", "particles"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be a positive integer, got {value}")
    options = {"seed": args.seed, "out": args.out, "progress": not args.quiet}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.particles is not None:
        options["particles"] = args.particles
    PROGRAMS[args.name].run(**options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
