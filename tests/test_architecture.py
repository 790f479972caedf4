"""The package's shape: an import graph without circles, function-local imports only for heavy
or optional dependencies, no argparse / print outside the CLI, modules of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "detection"
MAX_MODULE_LINES = 500
# What a function may import locally: heavy or optional third-party packages, and the lazy
# parts of the CLI (verb modules load only when their verb runs).
LOCAL_IMPORT_ALLOWED = ("transformers", "huggingface_hub", "supervision", "fiftyone", "matplotlib", "tqdm", "selenium",
                        "safetensors", "yaml", "scipy", "timm", "cv2", "pycocotools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The deepest existing module named by `target` (a.b.c or a.b with c an attribute)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


class ImportScan(ast.NodeVisitor):
    """Collects (target module, is function-local, line) for every import of a module, plus
    module names given to importlib as string constants (lazy exports, verb tables)."""

    def __init__(self, name: str, is_package: bool, modules: dict[str, Path], tree: ast.AST) -> None:
        self.name, self.is_package, self.modules = name, is_package, modules
        self.depth = 0
        self.edges: list[tuple[str, bool, int]] = []
        self.local_imports: list[tuple[str, int]] = []
        self.docstrings = _docstring_nodes(tree)

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node: ast.AST) -> None:
        local = self.depth > 0
        if local:
            self.local_imports.append((target, node.lineno))
        resolved = _resolve(target, self.modules) if target.startswith("detection") else None
        if resolved and resolved != self.name:
            self.edges.append((resolved, local, node.lineno))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.name if self.is_package else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            self._add(f"{base}.{alias.name}", node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # "detection.a.b" or "detection.a.b:name" (also the constant head of an f-string):
        # a module looked up by name, as lazy exports, verb tables and moved-name shims do
        if not isinstance(node.value, str) or id(node) in self.docstrings:
            return
        target = node.value.split(":", 1)[0].strip()
        if target.startswith("detection.") and target in self.modules and target != self.name:
            self.edges.append((target, True, node.lineno))


def scan() -> dict[str, ImportScan]:
    modules = all_modules()
    scans = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = ImportScan(name, path.name == "__init__.py", modules, tree)
        visitor.visit(tree)
        scans[name] = visitor
    return scans


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                strongconnect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return components


def test_scan_counts_lookups_by_name_as_edges():
    edges = {target for target, _, _ in scan()["detection.cli"].edges}
    assert "detection.cli.predict" in edges  # "detection.cli.predict" in the verb table
    assert "detection.structures" in {target for target, _, _ in scan()["detection"].edges}  # lazy export


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_circle():
    scans = scan()
    graph = {name: {target for target, _, _ in s.edges} for name, s in scans.items()}
    assert sum(len(v) for v in graph.values()) > 50  # the scan really sees the package's imports
    assert find_cycles(graph) == []


def test_function_local_imports_only_for_heavy_or_optional_dependencies():
    offenders = []
    for name, s in scan().items():
        for target, line in s.local_imports:
            top = target.split(".")[0]
            if top in LOCAL_IMPORT_ALLOWED:
                continue
            if name.startswith("detection.cli") and target.startswith("detection."):
                continue  # the CLI imports a verb's library only when that verb runs
            offenders.append(f"{name}:{line} imports {target}")
    assert offenders == []


def test_no_argparse_or_print_outside_the_cli():
    offenders = []
    for name, path in all_modules().items():
        if name.startswith("detection.cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "argparse" in names:
                    offenders.append(f"{name}:{node.lineno} imports argparse")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno} prints")
    assert offenders == []


def test_modules_stay_readable():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in all_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
