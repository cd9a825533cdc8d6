"""`align` as a user meets it: help for every command, one-line errors with exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from align.cli import commands, main
from align.stages import registry
from align.stages.huge_pages import huge_pages_for_mapped_heap


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=300, **kw)


def test_top_level_help_lists_every_registered_stage_and_tool(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == [*registry.names(), "run", "generate", "score", "push", "inspect"]


@pytest.mark.parametrize("command", list(commands()))
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


@pytest.mark.parametrize(
    ("argv", "recipe", "expected"),
    [
        (["--malloc_mmap_threshold", "4194304"], None, "1"),
        (["--malloc_mmap_threshold=4194304"], None, "1"),
        ([], "malloc_mmap_threshold: 4194304\n", "1"),
        ([], "learning_rate: 1.0e-5\n", None),  # the key unset: PyTorch's default heap, no variable
        ([], "malloc_mmap_threshold: null\n", None),
    ],
)
def test_ppo_with_mapped_heap_turns_on_huge_pages(tmp_path, monkeypatch, argv, recipe, expected):
    """A PPO run with `malloc_mmap_threshold` gets THP_MEM_ALLOC_ENABLE=1 before torch loads (from the command line or
    its recipe); without the key, nothing is set."""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    if recipe is not None:
        (tmp_path / "ppo.yaml").write_text(recipe)
        argv = ["--config", str(tmp_path / "ppo.yaml"), *argv]
    huge_pages_for_mapped_heap(argv)
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == expected


def test_huge_pages_left_to_the_user_who_sets_them(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    huge_pages_for_mapped_heap(["--malloc_mmap_threshold", "4194304"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
