"""One record per stage (issue 35): a stage defined here, with its own config and run, is registered with one call
and then runs through `align run`, and shows in the run report and on its Hub card, with nothing else edited.

The toy stage's entry and config are this module: `align run` starts each stage as its own process, which gets the
record through `ALIGN_STAGES` and imports this module from tests/ (on its PYTHONPATH here)."""

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from align.cli import main as cli_main
from align.config import parse_config, recipe_dict
from align.io import stage_lifecycle, write_stage_info
from align.stages import registry
from align.stages.registry import Stage, register, unregister

TESTS = Path(__file__).resolve().parent


@dataclass
class ToyConfig:
    """A toy stage: writes a greeting, and a score for it."""

    output_dir: str = field(default="", metadata={"help": "Where the toy stage writes."})
    greeting: str = field(default="hello", metadata={"help": "What the toy says."})
    repeats: int = field(default=2, metadata={"help": "How often it says it."})


@stage_lifecycle
def run(cfg: ToyConfig) -> Path:
    """Write a (fake) model dir, then align_stage.json last, as every stage does."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "greeting.txt").write_text(" ".join([cfg.greeting] * cfg.repeats))
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):  # what `align push` checks a model for
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    metrics = {"toy_score": 0.25 * cfg.repeats, "greeting_length": len(cfg.greeting)}
    write_stage_info(out, "toy", parent=None, recipe=recipe_dict(cfg), data=None, metrics=metrics)
    return out


def main(argv: list[str]) -> int:
    """`align toy ...`: the entry module's `main`, as for every stage."""
    run(parse_config("toy", argv))
    return 0


TOY = Stage(
    name="toy",
    help="a stage defined in a test",
    entry=__name__,
    config=f"{__name__}:ToyConfig",
    metrics=(("toy_score", "toy score"), ("greeting_length", "greeting length (characters)")),
    headline=("toy_score",),
    label="toy model",
    card_tags=("text-generation", "toy"),
    about="**A toy stage.** It says its greeting a few times.",
)


@pytest.fixture
def toy(monkeypatch):
    register(TOY)  # the one call
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    yield TOY
    unregister("toy")


def test_a_stage_registered_in_a_test_runs_in_a_chain_and_shows_in_the_report_and_card(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"output_root": "run", "stages": {"toy": {"greeting": "hi", "repeats": 4}},
                                     "report": {"examples": 0}}))  # fmt: skip
    assert cli_main(["run", str(chain)]) == 0

    info = json.loads((tmp_path / "run" / "toy" / "align_stage.json").read_text())
    assert info["stage"] == "toy" and info["metrics"] == {"toy_score": 1.0, "greeting_length": 2}
    assert info["recipe"]["greeting"] == "hi"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| toy | toy score | 1 |" in report and "| toy | greeting length (characters) | 2 |" in report
    assert "- **toy**:" in report

    assert cli_main(["push", "run/toy", "--repo_id", "me/toy", "--dry_run", "preview"]) == 0
    card = (tmp_path / "preview" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card
    assert "- align\n- toy\n- text-generation" in card
    assert "## What this stage did\n\n**A toy stage.** It says its greeting a few times." in card
    assert "| `toy_score` | 1 |" in card


def test_a_registered_stage_is_a_command_with_help(toy, capsys):
    assert cli_main(["--help"]) == 0
    assert "  toy       a stage defined in a test" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["toy", "--help"])
    assert e.value.code == 0
    assert "--greeting" in capsys.readouterr().out


def test_records_cross_to_stage_processes_as_json(toy):
    env = registry.child_env({})
    records = json.loads(env[registry.ENV])
    assert [r["name"] for r in records] == ["toy"]  # the built-in stages every process has already
    assert Stage(**records[0]) == TOY


def test_the_built_in_stages_in_chain_order():
    assert registry.names() == ("pretrain", "sft", "rank", "reward", "ppo", "dpo", "grpo", "rloo", "bon", "classify")
    for stage in registry.stages():
        assert dataclasses.is_dataclass(stage.config_class())  # each "module:Class" names a config
        assert set(stage.parents.values()) <= set(registry.names())
    assert registry.get("rank").repo_type == "dataset"


def test_ppo_prepares_huge_pages_before_torch_loads():
    from align.stages.huge_pages import huge_pages_for_mapped_heap

    prepare = registry.get("ppo").prepare
    module, _, name = prepare.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is huge_pages_for_mapped_heap


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"headline": ("nope",)}, "headline metrics ['nope'] are not rows"),
        ({"repo_type": "space"}, "repo_type 'space'"),
        ({"config": "no_colon"}, "give it as 'module:Class'"),
    ],
)
def test_a_bad_record_is_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(TOY, **change)


def test_a_taken_name_is_refused_and_built_ins_stay(toy):
    with pytest.raises(ValueError, match="registered already"):
        register(dataclasses.replace(TOY, help="another toy"))
    register(TOY)  # the same record again: nothing changes
    with pytest.raises(ValueError, match="built in"):
        unregister("sft")
