"""Every module imports on its own, and the import graph of lmlab has no cycle.

The graph is read from the source: the imports a module runs when it is imported (its top-level
statements, `if TYPE_CHECKING` blocks left out). Imports inside functions run later, when the
function is called; lmlab keeps one kind of those on purpose: `Model.from_pretrained` /
`save_pretrained` / `generate` delegate to lmlab.io and lmlab.generate, which build on Model,
as transformers' API has them on the model class.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(
    ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__") for p in (SRC / "lmlab").rglob("*.py")
)


def _file(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _resolve(name: str) -> str | None:
    """The lmlab module a dotted name refers to (a module, or the module holding a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_time_edges(module: str) -> set[str]:
    tree = ast.parse(_file(module).read_text())
    package = module if _file(module).name == "__init__.py" else module.rpartition(".")[0]
    edges: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                edges.update(filter(None, (_resolve(a.name) for a in node.names if a.name.startswith("lmlab"))))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                if base.startswith("lmlab"):
                    for a in node.names:
                        target = _resolve(f"{base}.{a.name}")
                        if target:
                            edges.add(target)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for sub in getattr(node, field, []):
                        visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])

    visit(tree.body)
    edges.discard(module)
    return edges


def test_the_import_graph_has_no_cycle():
    graph = {m: import_time_edges(m) for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in MODULES:
        if m not in state:
            cycle = dfs(m)
            assert cycle is None, " -> ".join(cycle)
    assert len(MODULES) > 40 and graph["lmlab.model.model"]  # the graph was really read


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    modules = [m for m in MODULES if m != "lmlab.__main__"]  # that one runs the command line
    for order in (modules, modules[::-1]):
        done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
