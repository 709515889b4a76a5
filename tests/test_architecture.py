"""The package's shape, checked: no import cycles, modules of a readable size, one module assigns Trainer
attributes, and the public surface is what the docs name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kto_plugin

PACKAGE = Path(kto_plugin.__file__).resolve().parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports at module level (a package's ``__init__`` counts as imported
    with any of its submodules, as Python runs it first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules:
                found.add(target)
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for target in list(found):
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules)
    found.discard(name)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work; an edge back into the package
    # from one of its submodules is what would make a cycle, so the parent edges of each submodule are dropped
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 30


def test_no_module_over_400_lines_without_a_reason_in_its_docstring():
    long = []
    for name, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(source)) or ""
            if "Why one module" not in doc:
                long.append(f"{name} ({source.count(chr(10))} lines)")
    assert not long, f"over {MAX_LINES} lines without 'Why one module' in the docstring: {long}"


def test_only_the_ledger_assigns_attributes_of_a_trainer():
    # `trainer.x = ...`, `self.trainer.args.x = ...`, `trainer.a, trainer.b = ...`, `setattr(trainer, ...)`
    pattern = re.compile(r"^\s*[\w.]*\btrainer\.[\w.]+\s*[,=](?!=)|(?<![\w.])setattr\(\s*[\w.]*trainer\b", re.M)
    offenders = []
    for name, path in _modules().items():
        if name == "kto_plugin.trainer._ledger":
            continue
        for match in pattern.finditer(path.read_text()):
            offenders.append(f"{name}: {match.group(0).strip()}")
    assert not offenders, offenders


def test_every_internal_module_is_private_and_the_public_surface_is_what_the_docs_name():
    for name in _modules():
        parts = name.split(".")[1:]
        # public modules: the top-level concepts and the sub-packages; every module inside a sub-package is private
        # (its public names are re-exported by the sub-package), except `python -m kto_plugin.cli`'s __main__
        assert len(parts) <= 1 or (len(parts) == 2 and parts[1].startswith("_")), name
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top == {
        "__init__", "_logging", "_version", "config", "errors", "hookspecs", "loss", "plugin",
        "data", "reference", "step", "hooks", "trainer", "integrations", "cli", "demo",
    }
    documented = set(re.findall(r"`(\w+)`", (PACKAGE.parent / "docs" / "README.md").read_text()))
    readme = (PACKAGE.parent / "README.md").read_text()
    for name in kto_plugin.__all__:
        if name != "__version__":
            assert name in readme or name in documented or _in_docs(name), name


def _in_docs(name: str) -> bool:
    return any(name in path.read_text() for path in (PACKAGE.parent / "docs").glob("*.md"))
