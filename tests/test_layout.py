"""The package's layers: imports point one way down LAYERS, and no module imports itself back."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "sugarize"

# Lowest first: a module may import its own layer or a lower one, never a higher one.
# "base" holds the modules every layer shares (the exception family, the defaults, train/eval modes).
LAYERS = ["base", "method", "passes", "files", "deploy", "training", "app"]
BASE = {"sugarize.errors", "sugarize.options", "sugarize.modes"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every sugarize module ``path`` imports, at module level or inside a function."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            for alias in node.names:  # "from . import op" names a module; "from .op import f" does not
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate, root) else target)
    return {m for m in found if _exists(m, root)} - {name}


def _exists(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the sugarize modules it imports. The package's own ``__init__`` (the lazy
    public facade: it imports nothing at run time but on attribute access, and every layer
    may read ``__version__`` from it) and ``__main__`` (``python -m sugarize``, the entry
    point above every layer) are left out."""
    graph = {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}
    graph.pop(root.name, None)
    graph.pop(f"{root.name}.__main__", None)
    return {m: deps - {root.name} for m, deps in graph.items()}


def layer_of(name: str) -> str | None:
    if name in BASE:
        return "base"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = layer_of(src), layer_of(dst)
            if a is None or b is None:
                bad.append(f"{src} -> {dst}: a module outside the layers")
            elif LAYERS.index(b) > LAYERS.index(a):
                bad.append(f"{src} ({a}) -> {dst} ({b}): an arrow up the layers")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_layer_and_imports_point_down():
    graph = import_graph(PACKAGE)
    assert [m for m in graph if not layer_of(m)] == []
    assert upward_arrows(graph) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def _planted(tmp_path: Path, module: str, line: str) -> dict[str, set[str]]:
    """The import graph of a copy of the package with ``line`` appended to ``module``."""
    copy = tmp_path / "sugarize"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    return import_graph(copy)


def test_a_planted_cycle_is_caught(tmp_path):
    graph = _planted(tmp_path, "method/saved.py", "def _planted():\n    from . import op  # noqa: F401")
    assert cycles(graph) == [["sugarize.method.kernels", "sugarize.method.op", "sugarize.method.saved"]]


def test_a_planted_upward_arrow_is_caught(tmp_path):
    graph = _planted(tmp_path, "method/surrogates.py", "from ..deploy import export  # noqa: E402,F401")
    assert upward_arrows(graph) == [
        "sugarize.method.surrogates (method) -> sugarize.deploy.export (deploy): an arrow up the layers"]


def test_import_sugarize_stays_light():
    import subprocess
    import sys

    code = "import sys, sugarize; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'typer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def private_imports(root: Path) -> list[str]:
    """Every place a module takes another sugarize module's underscore name: ``from .x import _y``,
    or ``x._y`` on a sugarize module it imported (``from . import x``, ``import sugarize.x``)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> sugarize module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root.name:
                    continue
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    if _exists(candidate, root):
                        aliases[alias.asname or alias.name] = candidate
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                        bad.append(f"{name} imports {alias.name} from {target}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == root.name and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name:
                bad.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(bad))


def test_no_module_takes_another_modules_private_names():
    """A leading underscore means "this module's own": another module that needs it gets a
    public name (issue #30)."""
    assert private_imports(PACKAGE) == []


def test_the_private_import_check_catches_one(tmp_path):
    pkg = tmp_path / "sugarize"
    (pkg / "a").mkdir(parents=True)
    for f in ("__init__.py", "a/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a" / "x.py").write_text("def _secret():\n    pass\n")
    (pkg / "a" / "y.py").write_text("from .x import _secret\nfrom . import x\nx._secret()\n")
    assert private_imports(pkg) == ["sugarize.a.y imports _secret from sugarize.a.x",
                                    "sugarize.a.y uses sugarize.a.x._secret"]
