"""`align` as a user meets it: help for every command, one-line errors with exit code 2, no traceback."""

import subprocess
import sys

import pytest

from align.cli import COMMANDS, main


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=300, **kw)


def test_top_level_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("pretrain", "generate"):
        assert name in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_unknown_command_suggests(capsys):
    assert main(["pretrian"]) == 2
    assert "did you mean 'pretrain'?" in capsys.readouterr().err


def test_bad_recipe_key_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/out\nlearning_rat: 0.1\n")
    result = _run("pretrain", "--config", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: unknown key 'learning_rat'; did you mean 'learning_rate'?"
    )
    assert "Traceback" not in result.stderr
