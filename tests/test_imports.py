"""Every module imports on its own; the import graph of lmlab has no cycle, and a lower layer never
imports a higher one (LAYERS).

The graph is read from the source: every import a module makes, at its top level and inside
functions alike (an import inside a function is a dependency too: it only runs later). Imports in
`if TYPE_CHECKING` blocks are left out: they name types and run nothing.
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


def _file_of(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


_file = _file_of


def _resolve(name: str) -> str | None:
    """The lmlab module a dotted name refers to (a module, or the module holding a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


# lowest first; a module may import its own layer and those below it, never one above
LAYERS: list[tuple[str, ...]] = [
    ("lmlab.errors", "lmlab.families", "lmlab.runtime", "lmlab.metrics", "lmlab.ngram", "lmlab.plots"),
    ("lmlab.config", "lmlab.settings", "lmlab.data.corpus"),
    ("lmlab.tokenizer", "lmlab.data", "lmlab.hf"),
    ("lmlab.checkpoint",),  # formats only: imports nothing from train/, io or the model class
    # decoding runs on the model's forward interface (as transformers' GenerationMixin sits below its
    # models), so Model.generate delegates down to it
    ("lmlab.generate", "lmlab.generation"),
    ("lmlab.model",),
    (
        "lmlab.io",
        "lmlab.adapters",
        "lmlab.export_gguf",
        "lmlab.quantize",
        "lmlab.info",
        "lmlab.embed",
        "lmlab.route",
        "lmlab.chat",
        "lmlab.fewshot",
    ),
    ("lmlab.train",),
    ("lmlab.tasks", "lmlab.evaluate", "lmlab.pretrain", "lmlab.finetune"),
    ("lmlab.compare", "lmlab.serve", "lmlab.demo"),  # drivers
    ("lmlab.cli", "lmlab.__main__", "lmlab"),  # the command line, and the package's lazy public names
]


def layer_of(module: str) -> int:
    """The layer of the longest LAYERS prefix that names `module` or a package above it."""
    best, level = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level is not None, f"{module} is in no layer of LAYERS: add it"
    return level


def import_time_edges(module: str, function_level: bool = False) -> set[str]:
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
            elif function_level and isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While)
            ):
                visit(node.body + getattr(node, "orelse", []))

    visit(tree.body)
    edges.discard(module)
    return edges


def all_edges(module: str) -> set[str]:
    """Every lmlab module `module` imports, at its top level or inside functions and classes."""
    return import_time_edges(module, function_level=True)


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})"
        for m in MODULES
        for n in sorted(all_edges(m))
        if layer_of(n) > layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """An io -> train import put back inside a function is caught (the circle this test was extended for)."""
    source = (
        _file("lmlab.io").read_text() + "\n\ndef _back():\n    from lmlab.train.checkpoint import good_checkpoint\n"
    )
    fake = tmp_path / "io.py"
    fake.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "_file", lambda m: fake if m == "lmlab.io" else _file_of(m))
    assert "lmlab.train.checkpoint" in all_edges("lmlab.io")
    assert "lmlab.train.checkpoint" not in import_time_edges("lmlab.io")
    assert layer_of("lmlab.train.checkpoint") > layer_of("lmlab.io")


def test_the_import_graph_has_no_cycle():
    graph = {m: all_edges(m) for m in MODULES}
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
