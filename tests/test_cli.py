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
