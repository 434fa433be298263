"""The rules of docs/architecture.md that a reader of the imports can check: no module imports another module's
private name, and the modules' imports draw no circle (``if TYPE_CHECKING:`` imports aside: they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synthmed"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    return lines


def _imports(name: str, path: Path):
    """(line, source module, imported name or None) of every import of a module that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, source, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    """``from x import _y`` couples a module to another's insides (synthmed's and other packages' alike);
    what is shared gets a public name. Attribute access ``module._y`` on an imported module counts too."""
    found = []
    for name, path in MODULES.items():
        aliases = {}
        for line, source, imported in _imports(name, path):
            if _private(imported):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {imported} from {source}")
            full = f"{source}.{imported}" if imported else source
            if full in MODULES:
                aliases[imported or source.split(".")[0]] = full
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and _private(node.attr):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def _graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for _, source, imported in _imports(name, path):
            full = f"{source}.{imported}" if imported else source
            if full in MODULES:
                targets.add(full)
            elif source in MODULES:
                targets.add(source)
        targets.discard(name)
        edges[name] = targets
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imports_draw_no_circle():
    """The flow reads one way (spec -> sampler -> prompts -> backends -> writers -> build -> qc): a module
    never imports, even inside a function, a module that imports it back."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_spec_language_stands_alone():
    """Validating a spec needs neither the sampler nor the prompts (nor anything downstream of them); it reads
    the quality checks' registry (the names a ``qc:`` section may use), a table that imports nothing."""
    downstream = {"synthmed.sampler", "synthmed.prompts", "synthmed.build", "synthmed.qc", "synthmed.writers"}
    edges = _graph()
    assert edges["synthmed.qc.registry"] == set()
    edges["synthmed.spec"] = edges["synthmed.spec"] - {"synthmed.qc.registry"}
    reached, todo = set(), ["synthmed.spec"]
    while todo:
        for target in edges[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert not {m for m in reached if any(m == d or m.startswith(d + ".") for d in downstream)}


def test_every_package_folder_is_installed():
    """pyproject.toml lists packages by hand: a new package folder missing there is missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
                 ["tool"]["setuptools"]["packages"])
    folders = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert folders - listed == set()


def test_no_source_file_is_ignored_by_git():
    """A module git ignores is missing from every clean checkout (a ``build/`` pattern once hid synthmed/build/)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (PACKAGE.parent / ".git").exists():
        pytest.skip("not a git checkout")
    sources = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")]
    run = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(sources), text=True,
                         capture_output=True, cwd=PACKAGE.parent)
    assert run.stdout.split() == []
