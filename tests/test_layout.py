"""The architecture, checked from the source's own imports (AST: lazy imports inside functions
count too): no import cycle, a layer order no module breaks, short files, and data_pipeline
standing alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "omni_ds")
MAX_LINES = 400

# Each module may import from its own layer and the layers before it, never from a later one.
LAYERS = [
    ["data_pipeline"],
    ["omni_ds", "omni_ds.errors", "omni_ds.dist"],
    ["omni_ds.config"],
    ["omni_ds.model"],
    ["omni_ds.ckpt"],
    ["omni_ds.eval"],
    ["omni_ds.train"],
    ["omni_ds.cli", "omni_ds.demo", "omni_ds.api"],
]

# The one sanctioned upward import: ``omni_ds.load_model`` is exported from the package by a
# module-level ``__getattr__`` that imports the API on first use (so ``import omni_ds`` stays
# light). Only imports inside that function, of exactly these modules, are left out of the graph.
LAZY_EXPORTS = {"omni_ds": {"omni_ds.api"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = lazy_export_nodes(tree) if name in LAZY_EXPORTS else set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` imports the submodule pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if node in lazy and target in LAZY_EXPORTS[name]:
                continue
            if target and target != name:
                found.add(target)
    return found


def lazy_export_nodes(tree: ast.Module) -> set[ast.AST]:
    """The import statements inside the module-level ``def __getattr__`` of ``tree``."""
    return {node for top in tree.body
            if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
            for node in ast.walk(top) if isinstance(node, ast.Import | ast.ImportFrom)}  # fmt: skip


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and len(m) > depth:
                best, depth = i, len(m)
    assert best is not None, f"{name} is in no layer; add its package to LAYERS"
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports_and_packages():
    graph = import_graph()
    assert "omni_ds.model.router" in graph["omni_ds.model.moe"]
    assert "omni_ds.ckpt.reshard" in graph["omni_ds.ckpt.saver"]  # a lazy import inside load()
    assert len(graph) > 40


def test_the_lazy_export_is_the_only_exemption_and_stays_lazy():
    files = source_files()
    tree = ast.parse(files["omni_ds"].read_text())
    lazy = {n.module for n in lazy_export_nodes(tree) if isinstance(n, ast.ImportFrom)}
    assert lazy == LAZY_EXPORTS["omni_ds"]
    assert "omni_ds.api" not in import_graph()["omni_ds"]
    code = ("import sys, omni_ds\n"
            "print('omni_ds.api' in sys.modules, callable(omni_ds.load_model), "
            "'omni_ds.api' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_no_module_imports_a_later_layer():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
        for name, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]
    assert upward == []


def test_a_cycle_and_an_upward_import_are_caught():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("omni_ds.train.trainer") > layer_of("omni_ds.ckpt.saver")


def test_files_are_short():
    long = {str(p.relative_to(ROOT)): n for p in source_files().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}


def test_data_pipeline_imports_nothing_from_omni_ds():
    modules = [name for name in source_files() if name.startswith("data_pipeline.")]
    assert len(modules) >= 5
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'omni_ds'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_path_outside_the_repository_is_cited():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    texts = [
        ROOT / f for f in tracked if Path(f).suffix in (".py", ".md", ".sh", ".sbatch", ".yaml")
    ]
    assert len(texts) > 50
    cited = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in texts
        if p.name != Path(__file__).name
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "shared/notes" in line or "../shared" in line
    ]
    assert cited == []
