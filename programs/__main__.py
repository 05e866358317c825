"""Command line: ``python -m programs NAME [options]``.

``python -m programs --help`` lists the programs; ``python -m programs NAME
--help`` lists that program's options. Every keyword argument of the
program's ``run`` with a plain type (int, float, str, bool, a ``Literal`` of
choices, optionally ``| None``) is an option, ``--snake-case``; its help is
the ``Args:`` entry of ``run``'s docstring, so what ``--steps`` and
``--particles`` mean is stated per program (for ``lgssm`` ``--steps`` is
the number of time steps). A keyword of type ``Sequence[int]`` or
``Sequence[str]`` takes one or more values (``--estimators rws vimco``). A
program with a ``SMOKE_CONFIG`` has ``--smoke``: its tiny sizes, which the
other options given override.

``python -m programs.NAME [options]`` is the same as ``python -m programs
NAME [options]`` (:func:`main_for`).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence

from programs import PROGRAMS

#: Options every program has, in this order; ``progress`` is ``--quiet``.
COMMON = ("steps", "particles", "seed", "out", "progress")
#: Options that must be positive integers.
POSITIVE = ("steps", "particles")


def _epilog() -> str:
    width = max(len(name) for name in PROGRAMS)
    lines = ["programs:"]
    for name, module in PROGRAMS.items():
        lines.append(f"  {name:<{width}}  {module.DESCRIPTION}")
    lines += [
        "",
        "python -m programs NAME --help lists NAME's options and what --steps and",
        "--particles mean for it.",
        "example: python -m programs vae_moons --steps 200 --out out",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the program name; its epilog lists every program."""
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
        "options", nargs=argparse.REMAINDER, help="the program's options"
    )
    return parser


def argument_docs(function: Callable) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, as one line each.

    Sphinx roles and literals are reduced to plain text for a terminal.
    """
    doc = inspect.getdoc(function) or ""
    entries: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^ {2}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    plain = {}
    for name, text in entries.items():
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
        plain[name] = text.replace("``", "")
    return plain


def _option_type(annotation) -> tuple[type | None, tuple | None, bool]:
    """``(base type, choices, accepts None)`` of an annotation, or ``None`` base.

    A sequence annotation gives its element's base type; :func:`_is_sequence`
    tells the two apart.
    """
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is (
        typing.Union
    ):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            return None, None, optional
        annotation = members[0]
    if _is_sequence(annotation):
        (element,) = typing.get_args(annotation)
        base, choices, _ = _option_type(element)
        return (None, None, optional) if base is bool else (base, choices, optional)
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, optional
    if annotation in (int, float, str, bool):
        return annotation, None, optional
    return None, None, optional


def _is_sequence(annotation) -> bool:
    """Whether ``annotation`` is ``Sequence[X]`` (``| None`` allowed) of one X."""
    members = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    members = tuple(a for a in members if a is not type(None))
    return (
        len(members) == 1
        and typing.get_origin(members[0]) in (Sequence, tuple, list)
        and len(typing.get_args(members[0])) == 1
    )


def _is_union(annotation) -> bool:
    return isinstance(annotation, types.UnionType) or (
        typing.get_origin(annotation) is typing.Union
    )


def _converter(base: type, optional: bool, flag: str) -> Callable[[str], object]:
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} takes {'none or ' if optional else ''}a {base.__name__}, "
                f"got {text!r}"
            ) from None

    return convert


def program_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one program's options, built from its ``run``."""
    module = PROGRAMS[name]
    run = module.run
    docs = argument_docs(run)
    hints = typing.get_type_hints(run)
    parser = argparse.ArgumentParser(
        prog=f"python -m programs {name}",
        description=module.DESCRIPTION,
    )
    smoke = getattr(module, "SMOKE_CONFIG", None)
    if smoke is not None:
        parser.add_argument(
            "--smoke",
            action="store_true",
            help=f"tiny sizes for a quick check: {smoke} (other options override)",
        )
    parameters = inspect.signature(run).parameters
    ordered = [p for p in COMMON if p in parameters]
    ordered += [p for p in parameters if p not in COMMON]
    for option in ordered:
        parameter = parameters[option]
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        help_text = docs.get(option, "")
        if option == "progress":
            parser.add_argument(
                "--quiet",
                dest="progress",
                action="store_false",
                help="no progress bar (final metrics are still printed)",
            )
            continue
        base, choices, optional = _option_type(hints.get(option))
        if base is None:
            continue  # not settable from the command line (e.g. a config object)
        flag = "--" + option.replace("_", "-")
        if base is bool:
            if parameter.default is True:
                flag = "--no-" + option.replace("_", "-")
            parser.add_argument(
                flag,
                dest=option,
                action="store_false" if parameter.default is True else "store_true",
                help=help_text,
            )
            continue
        default = parameter.default
        shown = "none" if default is None else default
        if isinstance(default, tuple | list):
            shown = " ".join(str(v) for v in default)
        parser.add_argument(
            flag,
            dest=option,
            type=_converter(base, optional, flag),
            choices=choices,
            default=default,
            nargs="+" if _is_sequence(hints.get(option)) else None,
            metavar=None if choices else option.upper(),
            help=f"{help_text} (default: {shown}"
            + ("; 'none' accepted)" if optional else ")"),
        )
    return parser


def parse(argv: list[str]) -> tuple[str, dict]:
    """``(program name, keyword arguments of its run)`` from the command line."""
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    if name not in PROGRAMS:
        parser.error(
            f"unknown program {name!r}; available: {', '.join(sorted(PROGRAMS))}"
        )
    sub = program_parser(name)
    options = vars(sub.parse_args(rest))
    if options.pop("smoke", False):
        # The smoke sizes replace the defaults, not what was given.
        sub.set_defaults(**PROGRAMS[name].SMOKE_CONFIG)
        options = vars(sub.parse_args(rest))
        options.pop("smoke")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    for option in POSITIVE:
        value = options.get(option)
        if value is not None and value < 1:
            sub.error(f"--{option} must be a positive integer, got {value}")
    return name, options


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, runs the named program and returns the exit status."""
    name, options = parse(sys.argv[1:] if argv is None else list(argv))
    PROGRAMS[name].run(**options)
    return 0


def main_for(name: str) -> int:
    """``python -m programs.NAME [options]``: :func:`main` with ``NAME`` first."""
    return main([name, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
