"""models/ imports downward only: file IO <- key maps <- orchestration, and no circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detection"

# lower number = lower layer; a module may import only modules of its own layer or below
LAYERS = {
    "detection.models.contract": 0,
    "detection.models.checkpoint_io": 1,
    "detection.models.published": 1,
    "detection.models.fold_bn": 1,
    "detection.models.detr_inference": 1,
    "detection.models.detr": 2,
    "detection.models.configs": 3,
    "detection.models.keymaps": 4,
    "detection.models.native": 5,
    "detection.models.convert": 6,
    "detection.models.registry": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every detection module `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_models_layers_import_downward_only(graph) -> None:
    assert set(LAYERS) <= set(graph)
    upward = [(module, target) for module, rank in LAYERS.items() for target in graph[module]
              if LAYERS.get(target, -1) > rank]
    assert upward == []


def test_no_import_circle_through_models(graph) -> None:
    """Depth-first search for a cycle among the modules models/ reaches."""
    start = [m for m in graph if m.startswith("detection.models")] + [
        "detection.engine.fast", "detection.postprocess", "detection.data.preprocess"]
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == "detection" or target.startswith(("detection.cli", "detection.train")):
                continue  # other owners' verb modules sit above models/
            assert state.get(target) != 1, " -> ".join(trail + [module, target])
            if target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in start:
        if module in graph and module not in state:
            visit(module, [])


def test_contract_imports_no_model_code(graph) -> None:
    assert graph["detection.models.contract"] == set()
    assert "detection.models.detr" not in graph["detection.engine.fast"]


PUBLIC_NAMES = {
    "detection.models.convert": [
        "AUTHORS_BACKBONE_PREFIX", "HF_BACKBONE_PREFIX", "HF_INDEX_FILES", "HF_WEIGHT_FILES",
        "NATIVE_BACKBONE_PREFIX", "authors_to_native", "convert_to_native", "detect_format",
        "hf_config_to_detr_config", "hf_to_native", "infer_authors_config", "load_authors_checkpoint",
        "load_foreign", "load_hf_folder", "native_to_authors", "save_authors_checkpoint"],
    "detection.models.registry": [
        "ARCHITECTURE", "CONFIG_DIR", "DEMO_DIR", "FORMAT_VERSION", "META_FILE", "REPO_ROOT", "WEIGHTS_FILE",
        "available_configs", "build_model", "is_native_folder", "load_config", "load_model", "load_native",
        "read_model_meta", "replace_class_head", "save_model", "DETR", "DetrConfig"],
    "detection.engine.fast": [
        "InferenceModel", "Precision"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_names_import_without_warnings(module: str) -> None:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = importlib.import_module(module)
        missing = [name for name in PUBLIC_NAMES[module] if not hasattr(loaded, name)]
    assert missing == []


def test_package_exports_the_contract() -> None:
    import detection
    from detection.models.contract import Detector, PostprocessRule, PreprocessSpec

    assert (detection.Detector, detection.PreprocessSpec, detection.PostprocessRule) == (
        Detector, PreprocessSpec, PostprocessRule)
