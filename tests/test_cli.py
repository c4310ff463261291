"""`fer` loads only the module of the command it runs (a stage's dvc.yaml deps are the
dispatcher and that module), yet `fer --help` and a typo still see every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fer_pipeline.cli import COMMANDS, _command, build_parser, main


@pytest.mark.parametrize("argv, command", [
    (["train", "--model", "fernet"], "train"),
    (["--params", "p.yaml", "-v", "split", "--out", "x"], "split"),
    (["-v", "--params=p.yaml", "predict", "a.jpg"], "predict"),
    (["--help"], None),
    (["trian", "--model", "x"], None),
    ([], None),
])
def test_the_command_is_found_before_parsing(argv, command):
    assert _command(argv) == command


def test_help_lists_every_command_in_order():
    text = build_parser().format_help()
    positions = [text.index(f"\n    {name} ") for name in COMMANDS]
    assert positions == sorted(positions)


def test_a_typo_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_a_stage_command_loads_no_other_command():
    code = ("import sys; from fer_pipeline.cli import build_parser, _command; "
            "build_parser(_command(['train', '--all'])); "
            "print(sorted(m for m in sys.modules if m.startswith('fer_pipeline.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['fer_pipeline.cli.train']"
