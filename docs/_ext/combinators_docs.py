"""A small Sphinx extension for the API reference of ``combinators``.

One directive, ``.. apimodule:: combinators.NAME``, documents a public module:
its docstring and the names of its ``__all__`` that it defines (autodoc), then
a table of the names it re-exports, each linked to the one place where that
object is documented (its *home*) and registered as a cross-reference target
under the re-exporting module's name too (``combinators.propose`` links to
``combinators.api.propose``). So every public name has a page anchor, each
object is described once, and the table is computed from ``__all__``: a new
name shows up without editing the pages.

The home of a name is the public module whose source defines it; for an
object defined in a private module (``combinators.api._propose``) it is the
public package that exports it (``combinators.api``).

At the end of reading, the extension warns (and ``-W`` fails the build) when
a public module has no ``apimodule`` page, when a name's home is not
documented, or when a name that autodoc documents has no docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import types
from functools import cache
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PACKAGE = "combinators"


def _is_private(module_name: str) -> bool:
    return any(part.startswith("_") for part in module_name.split("."))


@cache
def all_modules() -> tuple[str, ...]:
    """Every module of the package, private ones included, the package first."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        names.append(info.name)
    return tuple(names)


def public_modules() -> tuple[str, ...]:
    """Every public module of the package, the package itself first."""
    return tuple(name for name in all_modules() if not _is_private(name))


@cache
def _defined_names(module_name: str) -> frozenset[str]:
    """Names bound at top level by ``def``, ``class`` or assignment."""
    module = importlib.import_module(module_name)
    source = Path(inspect.getfile(module)).read_text()
    names: set[str] = set()
    for node in ast.parse(source).body:
        names.update(_bound_names(node))
    return frozenset(names)


@cache
def _assigned_names(module_name: str) -> frozenset[str]:
    """Names bound at top level by assignment (data and aliases)."""
    module = importlib.import_module(module_name)
    source = Path(inspect.getfile(module)).read_text()
    return frozenset(
        name
        for node in ast.parse(source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for name in _bound_names(node)
    )


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _all(module_name: str) -> list[str]:
    return list(getattr(importlib.import_module(module_name), "__all__", []))


def _defining_module(module_name: str, name: str) -> str | None:
    """The module whose source defines the object ``module_name.name``."""
    obj = getattr(importlib.import_module(module_name), name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    candidates = []
    own = getattr(obj, "__module__", None)
    if isinstance(own, str) and own.startswith(PACKAGE):
        candidates.append(own)
    candidates.append(module_name)
    # Data (strings, tuples, aliases) has no __module__: look for the module
    # that assigns the name to this very object.
    candidates.extend(all_modules())
    for candidate in candidates:
        module = importlib.import_module(candidate)
        if name in _defined_names(candidate) and getattr(module, name, None) is obj:
            return candidate
    return None


@cache
def home(module_name: str, name: str) -> str:
    """The full name under which ``module_name.name`` is documented."""
    obj = getattr(importlib.import_module(module_name), name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    defining = _defining_module(module_name, name) or module_name
    if not _is_private(defining):
        return f"{defining}.{name}"
    # Defined in a private module: documented by the nearest public package
    # above it that exports it.
    parts = defining.split(".")
    while parts and _is_private(".".join(parts)):
        parts.pop()
    package = ".".join(parts)
    if name in _all(package):
        return f"{package}.{name}"
    return f"{module_name}.{name}"


def _in_source_order(module_name: str, names: list[str]) -> list[str]:
    """``names`` in the order their definitions appear in the source."""
    module = importlib.import_module(module_name)
    if not all(name in _defined_names(module_name) for name in names):
        return names  # a package exporting its private modules' objects
    source = Path(inspect.getfile(module)).read_text()
    order: dict[str, int] = {}
    for index, node in enumerate(ast.parse(source).body):
        for name in _bound_names(node):
            order.setdefault(name, index)
    return sorted(names, key=lambda name: order[name])


def _objtype(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _summary(module_name: str, name: str) -> str:
    """The first sentence of the object's docstring (or ``#:`` comment)."""
    obj = getattr(importlib.import_module(module_name), name)
    doc = None
    if isinstance(obj, types.ModuleType) or inspect.isclass(obj) or callable(obj):
        doc = inspect.getdoc(obj)
    if not doc:
        target = home(module_name, name)
        owner, _, attr = target.rpartition(".")
        try:
            attr_docs = ModuleAnalyzer.for_module(owner).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source: no summary
            attr_docs = {}
        doc = "\n".join(attr_docs.get(("", attr), []))
    first = (doc or "").strip().split("\n\n")[0]
    # Roles become literals: the summary is read far from its module, where
    # a short target such as :func:`ffbs` would not resolve.
    first = _ROLE.sub(lambda m: f"``{m.group(1).split('.')[-1]}``", first)
    return " ".join(first.split())


_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^`]*>)?`")


class APIModule(SphinxDirective):
    """``.. apimodule:: combinators.NAME``: a module's reference."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        """The module's autodoc entries, then its table of re-exports."""
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        self.env.note_dependency(inspect.getfile(module))
        documented = self.env.domaindata.setdefault(
            "combinators_docs", {"modules": {}}
        )["modules"]
        documented[module_name] = self.env.docname

        own, reexported = [], []
        for name in _all(module_name):
            target = home(module_name, name)
            is_module = isinstance(getattr(module, name), types.ModuleType)
            if target == f"{module_name}.{name}" and not is_module:
                own.append(name)
            else:
                reexported.append((name, target))

        lines = [f".. automodule:: {module_name}", ""]
        assigned = _assigned_names(module_name)
        for name in _in_source_order(module_name, own):
            obj = getattr(module, name)
            full = f"{module_name}.{name}"
            if name in assigned:
                # Data, or another name for an object (Array = jax.Array,
                # an alias of a function): described by its '#:' comment.
                lines += [f".. autodata:: {full}"]
                if isinstance(obj, type) or callable(obj):
                    lines.append("   :no-value:")
                lines.append("")
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {full}", "   :members:"]
                lines += ["   :show-inheritance:", "   :special-members: __call__", ""]
            else:
                lines += [f".. autofunction:: {full}", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=""), 0, container)
        result = list(container.children)
        if reexported:
            result.extend(self._table(module_name, reexported))
        return result

    def _table(self, module_name: str, rows) -> list[nodes.Node]:
        domain = self.env.get_domain("py")
        rubric = nodes.rubric(text=f"Names re-exported by {module_name}")
        table = nodes.table(classes=["reexports"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (25, 30, 45):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row(
            [[nodes.Text(t)] for t in ("name", "documented as", "summary")]
        )
        body = nodes.tbody()
        group += body
        for name, target in rows:
            obj = getattr(importlib.import_module(module_name), name)
            objtype = _objtype(obj)
            full = f"{module_name}.{name}"
            name_node = nodes.literal(text=name)
            role = "mod" if objtype == "module" else "obj"
            link, _ = self.parse_inline(f":py:{role}:`{target}`", lineno=self.lineno)
            summary, _ = self.parse_inline(
                _summary(module_name, name), lineno=self.lineno
            )
            row = self._row([[name_node], link, summary])
            if objtype != "module":
                node_id = f"reexport-{full}"
                row["ids"].append(node_id)
                # aliased: a short reference such as :class:`Trace` resolves
                # to the documented object, not to one of its aliases.
                domain.note_object(full, objtype, node_id, aliased=True, location=row)
            body += row
        return [rubric, table]

    @staticmethod
    def _row(cells) -> nodes.row:
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *content)
            row += entry
        return row


def _purge(app: Sphinx, env, docname: str) -> None:
    modules = env.domaindata.get("combinators_docs", {}).get("modules", {})
    for name in [m for m, doc in modules.items() if doc == docname]:
        del modules[name]


def _merge(app: Sphinx, env, docnames, other) -> None:
    mine = env.domaindata.setdefault("combinators_docs", {"modules": {}})
    theirs = other.domaindata.get("combinators_docs", {"modules": {}})
    mine["modules"].update(theirs["modules"])


def _check(app: Sphinx, env) -> None:
    """Every public module has a page and every public name a documented home."""
    documented = env.domaindata.get("combinators_docs", {}).get("modules", {})
    for module_name in public_modules():
        if module_name not in documented:
            logger.warning(
                "public module %s has no '.. apimodule::' page under docs/api/",
                module_name,
                type="combinators",
            )
            continue
        for name in _all(module_name):
            target = home(module_name, name)
            owner = target.rpartition(".")[0]
            if owner not in documented and target not in documented:
                logger.warning(
                    "%s.%s is documented as %s, but %s has no page",
                    module_name,
                    name,
                    target,
                    owner,
                    type="combinators",
                )


def _require_docstring(app: Sphinx, what, name, obj, options, lines) -> None:
    """A public name that autodoc documents must say what it is.

    Data without a ``#:`` comment would show its type's docstring (``dict``'s
    for a dict of schemes): that counts as no docstring.
    """
    if what == "module" or not name.startswith(PACKAGE + "."):
        return
    if what == "data":
        inherited = inspect.getdoc(type(obj)) or ""
        if "\n".join(lines).strip() == inherited.strip():
            lines[:] = []
    if not any(line.strip() for line in lines):
        logger.warning(
            "%s has no docstring (for data: a '#:' comment above it)",
            name,
            type="combinators",
        )


def _public_bases(app: Sphinx, name, obj, options, bases: list) -> None:
    """Private base classes are replaced by their own (public) bases."""
    index = 0
    while index < len(bases):
        base = bases[index]
        if getattr(base, "__name__", "").startswith("_"):
            bases[index : index + 1] = list(base.__bases__)
        else:
            index += 1


def _skip_namedtuple_fields(app: Sphinx, what, name, obj, skip, options):
    """NamedTuple fields: their docstrings only say "Alias for field number".

    The class docstring's ``Attributes:`` section describes them instead.
    """
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def setup(app: Sphinx) -> dict:
    """Registers the directive and the completeness checks."""
    app.add_directive("apimodule", APIModule)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check)
    # Before napoleon (priority 500) rewrites the lines.
    app.connect("autodoc-process-docstring", _require_docstring, priority=100)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-bases", _public_bases)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
