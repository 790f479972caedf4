import subprocess
import sys

import pytest

from detection import cli


def test_every_verb_module_exposes_add_arguments_and_run():
    import importlib

    for verb, (module_name, _) in cli.VERBS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments), verb
        assert callable(module.run), verb


def test_unknown_verb_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-verb"])
    assert info.value.code == 2


def test_console_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "detection.cli", "--help"], capture_output=True, text=True, check=True
    )
    for verb in cli.VERBS:
        assert verb in out.stdout


def test_every_verb_lives_in_the_cli_package():
    assert set(cli.VERBS) == {"predict", "eval", "train", "synth", "report", "weights", "export"}
    assert all(module_name == f"detection.cli.{verb}" for verb, (module_name, _) in cli.VERBS.items())


def test_python_m_detection_cli_runs_a_verb():
    out = subprocess.run([sys.executable, "-m", "detection.cli", "predict", "--help"],
                         capture_output=True, text=True, check=True)
    assert "usage: detr-attn predict" in out.stdout and "--save-attention" in out.stdout


def test_console_script_entry_point_is_the_cli_main():
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("[", 1)[0]
    assert scripts.strip() == 'detr-attn = "detection.cli:main"'


def test_library_modules_of_the_prediction_side_neither_parse_arguments_nor_print():
    """argparse, print and exit statuses live in detection/cli/ only."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "detection"
    files = [package / "data" / "synthetic.py", *sorted((package / "render").glob("*.py"))]
    files += [package / "data" / "sources.py", *sorted((package / "engine").glob("*.py")),
              *sorted((package / "runfolder").glob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert "argparse" not in names and "sys" not in names, f"{path.name} imports argparse/sys"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name}:{node.lineno} prints"
