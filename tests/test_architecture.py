"""The package's shape: packages in layers that import downward only, an import graph without
circles, function-local imports only for heavy or optional dependencies, no argparse / print
outside the CLI, modules of a readable size, method names spelled only where the method lives."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "detection"
MAX_MODULE_LINES = 400
#: The package layers, lowest first (docs/ARCHITECTURE.md "Layers" is this table): a unit (a
#: package, or a top-level module) may import its own modules and units of LOWER layers only;
#: two units of one layer do not import each other.
PACKAGE_LAYERS: list[tuple[str, ...]] = [
    ("structures", "boxes", "io", "resources", "runtime", "text", "version", "models.contract"),  # base
    ("models", "data", "postprocess"),
    ("attention",),
    ("runfolder",),    # the run folder's formats: above attention, whose geometry the npz store
    ("render",),
    ("engine",),
    ("evaluation",),
    ("train",),
    ("api",),
    ("cli", "detection"),  # the shell, and the root package's lazy exports
]
# What a function may import locally: heavy or optional third-party packages, and the lazy
# parts of the CLI (verb modules load only when their verb runs).
LOCAL_IMPORT_ALLOWED = ("transformers", "huggingface_hub", "supervision", "fiftyone", "matplotlib", "tqdm", "selenium",
                        "safetensors", "yaml", "scipy", "timm", "cv2", "pycocotools", "ray", "pyarrow", "moto")


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


def unit_of(module: str) -> str:
    """The layer unit of a module: "models.contract", a package under detection/, a top-level
    module, or "detection" (the root package)."""
    parts = module.split(".")
    if module == "detection.models.contract":
        return "models.contract"
    return parts[1] if len(parts) > 1 else "detection"


def layer_of(unit: str) -> int:
    for rank, units in enumerate(PACKAGE_LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"unit {unit!r} is in no layer of PACKAGE_LAYERS: add it to the table")


def layer_violations(edges: list[tuple[str, str, int]]) -> list[str]:
    """Every (module, target, line) edge between two units that does not point to a lower layer."""
    found = []
    for module, target, line in edges:
        source, goal = unit_of(module), unit_of(target)
        if source != goal and layer_of(source) <= layer_of(goal):
            found.append(f"{module}:{line} imports {target} ({source}, layer {layer_of(source)} -> "
                         f"{goal}, layer {layer_of(goal)})")
    return found


def _all_edges() -> list[tuple[str, str, int]]:
    return [(name, target, line) for name, s in scan().items() for target, _, line in s.edges]


def test_every_module_belongs_to_a_layer():
    assert sorted({unit_of(name) for name in all_modules()} - {u for units in PACKAGE_LAYERS for u in units}) == []


def test_packages_import_downward_only():
    """Top-level and function-local imports and lookups by name (lazy exports, the verb table) alike."""
    edges = _all_edges()
    assert len(edges) > 200
    assert layer_violations(edges) == []


def test_the_layer_check_fails_on_a_planted_upward_import():
    edges = _all_edges()
    planted = [("detection.data.images", "detection.engine.predictor", 1),  # a lower layer importing a higher one
               ("detection.models.registry", "detection.data.images", 2),  # two units of one layer
               ("detection.attention.maps", "detection.runfolder.maps_npz", 3)]  # the formats sit above attention
    assert layer_violations(edges + planted) == [
        "detection.data.images:1 imports detection.engine.predictor (data, layer 1 -> engine, layer 5)",
        "detection.models.registry:2 imports detection.data.images (models, layer 1 -> data, layer 1)",
        "detection.attention.maps:3 imports detection.runfolder.maps_npz (attention, layer 2 -> runfolder, layer 3)"]


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


#: Where a method's name may be spelled besides the registry and the method's own module: the
#: rollout LAYER choice of `attention.aggregate` (ROLLOUT_LAYERS) is named like the rollout method.
NAME_OWNERS_BESIDES_THE_METHOD = {"rollout": {"detection.attention.aggregate"}}


def _exempt_string_nodes(tree: ast.AST) -> set[int]:
    """Strings that are not method names though they may equal one: help texts (`help=`), the
    field names of file formats (dict keys, subscripts, `.get(name)`, members of set literals) and
    the members of `Literal[...]` types."""
    exempt: set[int] = set()

    def strings(node: ast.AST | None) -> None:
        for inner in ast.walk(node) if node is not None else ():
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                exempt.add(id(inner))

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            strings(node.value)
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                strings(key)
        elif isinstance(node, ast.Subscript):
            strings(node.slice)
        elif isinstance(node, ast.Set):
            for element in node.elts:
                strings(element)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args):
            strings(node.args[0])
    return exempt


def method_name_literals(modules: dict[str, Path]) -> list[str]:
    """Every string literal equal to a registered method's name outside the registry and that
    method's own module (docstrings and the exemptions above aside)."""
    from detection.attention.methods import METHODS

    owners = {name: {"detection.attention.methods.table", method.__module__,
                     *NAME_OWNERS_BESIDES_THE_METHOD.get(name, ())} for name, method in METHODS.items()}
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstring_nodes(tree) | _exempt_string_nodes(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in owners
                    and id(node) not in skip and module not in owners[node.value]):
                found.append(f"{module}:{node.lineno} spells {node.value!r}")
    return found


def test_method_names_are_spelled_only_where_the_method_lives():
    assert method_name_literals(all_modules()) == []


def test_the_method_name_check_finds_a_planted_literal(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Docstring naming raw is fine."""\nMETHOD = "relevance"\n'
                       'parser.add_argument("--x", help="attn-grad in help is fine")\nfields = {"drise": 1}\n')
    assert method_name_literals({"detection.engine.planted": planted}) == [
        "detection.engine.planted:2 spells 'relevance'"]


#: Base names two modules may share: the same concept at two layers (docs/ARCHITECTURE.md says so).
SHARED_BASE_NAMES = {"report": {"detection.cli.report", "detection.render.report"}}


def test_no_two_modules_share_a_base_name_unless_one_concept_at_two_layers():
    by_name: dict[str, set[str]] = {}
    for name, path in all_modules().items():
        if path.name not in ("__init__.py", "__main__.py"):
            by_name.setdefault(path.stem, set()).add(name)
    shared = {stem: modules for stem, modules in by_name.items() if len(modules) > 1}
    assert shared == SHARED_BASE_NAMES
