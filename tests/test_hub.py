"""`align push` against a local Hub-compatible server (tests/hub_server.py): files, cards, lineage, errors, secrecy."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
from hub_server import HubServer  # tests/ is on sys.path (pytest's rootdir-relative import)

from align.errors import AlignError
from align.io import write_stage_info

TOKEN = "hf_WRITEsecretTOKEN0123456789"  # looks like a real token so a leak would be found by substring
READ_TOKEN = "hf_READonlySECRET9876543210"
BAD_TOKEN = "hf_BADtokenSECRET5555555555"

LOG_HISTORY = [
    {"step": 10, "epoch": 0.5, "loss": 3.2, "learning_rate": 3e-4, "grad_norm": 1.5},
    {"step": 20, "epoch": 1.0, "loss": 2.6, "learning_rate": 1.5e-4, "grad_norm": 1.1},
    {"step": 20, "epoch": 1.0, "eval_loss": 2.1, "eval_runtime": 0.3, "eval_samples_per_second": 100.0},
    {"step": 20, "train_runtime": 5.0, "train_loss": 2.9, "total_flos": 1.0},
]
SAMPLES = [{"prompt": "Tell me about the cat.", "response": "The cat sat. ```not a fence end", "gold_score": 0.8}]


# Fixtures


@pytest.fixture(scope="module")
def model_template(tmp_path_factory) -> Path:
    """A tiny real Llama + word-level tokenizer + generation config, saved the way a stage saves them."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from align.models.modeling import wordlevel_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("template")
    tok = wordlevel_tokenizer("the cat sat on a mat and dog ran".split(), model_max_length=64)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(max_new_tokens=8).save_pretrained(out)
    return out


def make_stage(root: Path, name: str, stage: str, template: Path, *, parent=None, data=None, metrics=None, **extra):
    """A finished stage dir `root/name`: the template's files plus align_stage.json."""
    out = root / name
    if stage == "rank":
        out.mkdir(parents=True)
        rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}]
        (out / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        shutil.copytree(template, out)
    write_stage_info(
        out,
        stage,
        parent=parent,
        recipe={"learning_rate": 3e-4, "output_dir": str(out)},
        data=data or {"name": "tinyworld", "fingerprint": "abc123", "rows": 1200},
        metrics=metrics if metrics is not None else {"eval_loss": 1.92, "gold_score": 0.41, "train_loss": 2.9},
        log_history=LOG_HISTORY,
        samples=SAMPLES,
        **extra,
    )
    return out


def stage_parent(path: Path) -> dict:
    return {"stage": json.loads((path / "align_stage.json").read_text())["stage"], "path": str(path.resolve())}


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The suite runs with HF_HUB_OFFLINE=1 (conftest), which huggingface_hub reads at import: lift it for the
    local server; make the login cache a missing file so only HF_TOKEN counts."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-cache"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(online, monkeypatch):
    with HubServer(tokens={TOKEN: "write", READ_TOKEN: "read"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def card_of(files: dict[str, bytes]):
    from huggingface_hub import ModelCard

    return ModelCard(files["README.md"].decode())


def expected_files(stage_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(stage_dir).as_posix(): p.read_bytes()
        for p in stage_dir.rglob("*")
        if p.is_file() and p.name != "align_hub.json"
    }


# Pure parts


def test_curve_panels_pair_train_with_eval():
    from align.evaluation.plots import curve_keys, curve_panels, training_curves_png

    # epoch/step/total_flos, *_runtime, *_per_second and the one-off train_loss are not curves.
    keys = curve_keys(LOG_HISTORY)
    assert keys == ["loss", "learning_rate", "grad_norm", "eval_loss"]
    assert curve_panels(keys) == [["loss", "eval_loss"], ["learning_rate"], ["grad_norm"]]
    # No loss/learning_rate: the rest sorted, each x beside its eval_x.
    assert curve_panels(["reward", "ppo/kl", "eval_reward"]) == [["ppo/kl"], ["reward", "eval_reward"]]
    assert training_curves_png([{"step": 1, "epoch": 1.0}], "t") is None
    assert training_curves_png(None, "t") is None


@pytest.mark.parametrize(
    "name, hub",
    [("acme/base-7b", True), ("tinyworld", False), ("/abs/runs/sft", False), ("data/sft.jsonl", False),
     ("a/b/c", False), ("bad--name/x", False)],
)  # fmt: skip
def test_is_hub_id(name, hub):
    from align.hub.lineage import is_hub_id

    assert is_hub_id(name) is hub


def test_a_base_model_copy_links_to_its_hub_id(tmp_path):
    from align.hub.card import build_model_card
    from align.hub.lineage import base_model_of, lineage

    # A GGUF copy named by model_hub_id (align.io.parent_of): sft's base is the Hub repo, and so is ppo's via sft.
    hub_id, gguf = "HuggingFaceTB/SmolLM2-135M-Instruct", "/some/SmolLM2-135M-Instruct.Q4_1.gguf"
    sft = tmp_path / "sft"
    write_stage_info(sft, "sft", parent={"model": gguf, "hub_id": hub_id}, recipe={}, data=None, metrics={})
    chain = lineage(sft, {}, "https://huggingface.co")
    assert (chain[0].model, chain[0].repo_id) == (gguf, hub_id)
    assert base_model_of(chain) == hub_id
    ppo = tmp_path / "ppo"
    reward = {"model": gguf, "hub_id": hub_id}
    write_stage_info(ppo, "ppo", parent=stage_parent(sft), parents=[stage_parent(sft), reward], recipe={}, data=None,
                     metrics={})  # fmt: skip
    assert base_model_of(lineage(ppo, {}, "https://huggingface.co")) == hub_id  # the nearest ancestor on the Hub
    card = build_model_card(sft, repo_id="me/smol-sft", endpoint="https://hf.test")
    assert card.data.base_model == hub_id
    assert f"base model [{hub_id}](https://hf.test/{hub_id}), from its copy `SmolLM2-135M-Instruct.Q4_1.gguf`" in (
        card.text
    )
    text = build_model_card(ppo, repo_id="me/smol-ppo", endpoint="https://hf.test").text
    also = text[text.index("Also used to train this stage") :]
    assert f"[{hub_id}](https://hf.test/{hub_id})" in also  # a non-policy parent with a hub_id links the same way


def test_find_stages_orders_parents_first(tmp_path, model_template):
    from align.hub.push import find_stages

    # Names sort the wrong way on purpose: "a-ppo" < "b-sft" < "c-pretrain"; parents must still come first.
    pre = make_stage(tmp_path, "c-pretrain", "pretrain", model_template)
    sft = make_stage(tmp_path, "b-sft", "sft", model_template, parent=stage_parent(pre))
    make_stage(tmp_path, "a-ppo", "ppo", model_template, parent=stage_parent(sft))
    (tmp_path / "notes").mkdir()  # not a stage: ignored
    assert [p.name for p in find_stages(tmp_path)] == ["c-pretrain", "b-sft", "a-ppo"]


# One stage


def test_push_stage_uploads_every_file_byte_identical(hub, tmp_path, model_template):
    from align.hub.upload import push_stage

    sft = make_stage(tmp_path, "sft", "sft", model_template, parent={"model": "acme/base-7b"})
    want = expected_files(sft)
    # What must stay local: Trainer checkpoints, TensorBoard logs, pickled training args.
    (sft / "checkpoint-20").mkdir()
    (sft / "checkpoint-20" / "optimizer.pt").write_bytes(b"pickle")
    (sft / "runs").mkdir()
    (sft / "runs" / "events.out").write_bytes(b"tb")
    (sft / "training_args.bin").write_bytes(b"pickle")

    url = push_stage(sft, "me/tiny-sft")

    got = hub.files("me/tiny-sft")
    assert set(got) == set(want) | {"README.md", "training_curves.png"}
    for name, data in want.items():
        assert got[name] == data, name
    assert got["training_curves.png"].startswith(b"\x89PNG\r\n\x1a\n")
    [commit] = hub.commits("me/tiny-sft")  # one commit for everything
    assert url == f"{hub.url}/me/tiny-sft/commit/{commit['oid']}"
    assert commit["summary"] == "align: push the sft stage"
    # Every API call carried the token (the LFS PUT to storage would not, but this push sent none).
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}
    assert hub.endpoints() == {
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        "POST /api/models/{repo}/preupload/{rev}",
        "POST /api/models/{repo}/commit/{rev}",
    }
    record = json.loads((sft / "align_hub.json").read_text())
    assert record["repo_id"] == "me/tiny-sft" and record["endpoint"] == hub.url


def test_model_card_metadata_and_prose(hub, tmp_path, model_template):
    from align.hub.upload import push_stage

    sft = make_stage(tmp_path, "sft", "sft", model_template, parent={"model": "acme/base-7b"})
    push_stage(sft, "me/tiny-sft")
    card = card_of(hub.files("me/tiny-sft"))

    assert card.data.base_model == "acme/base-7b"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers"
    assert {"align", "sft", "text-generation", "rlhf"} <= set(card.data.tags)
    assert card.data.datasets is None  # "tinyworld" is align's generator, not a Hub dataset
    # model-index holds eval metrics only: train_loss is not an evaluation result.
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("eval_loss", 1.92),
        ("gold_score", 0.41),
    }
    assert card.data.to_dict()["model-index"][0]["name"] == "me/tiny-sft"
    text = card.text
    assert "Supervised fine-tuning (InstructGPT step 1)" in text
    assert "![training curves](training_curves.png)" in text
    assert "<details>" in text and "learning_rate: 0.0003" in text
    assert "Tell me about the cat." in text
    assert "````text\nThe cat sat. ```not a fence end\n````" in text  # a sample cannot close its own fence
    assert 'pipeline("text-generation", model="me/tiny-sft")' in text
    assert "| `eval_loss` | 1.92 |" in text
    assert "[acme/base-7b](" in text  # lineage links the base model


# Chains


def _chain(root: Path, template: Path) -> dict[str, Path]:
    pre = make_stage(root, "pretrain", "pretrain", template, parent=None)
    sft = make_stage(root, "sft", "sft", template, parent=stage_parent(pre))
    rank = make_stage(root, "rank", "rank", template, parent=stage_parent(sft), metrics={})
    reward = make_stage(
        root, "reward", "reward", template, parent=stage_parent(sft),
        data={"name": str(rank.resolve()), "fingerprint": "r", "rows": 1},
        metrics={"eval_accuracy": 0.75},
    )  # fmt: skip
    ppo = make_stage(
        root, "ppo", "ppo", template, parent=stage_parent(sft), parents=[stage_parent(sft), stage_parent(reward)]
    )
    return {"pretrain": pre, "sft": sft, "rank": rank, "reward": reward, "ppo": ppo}


def test_push_run_pushes_parents_first_and_links_cards(hub, tmp_path, model_template):
    from huggingface_hub import DatasetCard

    from align.hub.push import push_run

    _chain(tmp_path / "made", model_template)
    # The run dir moved after training: recorded parent paths are stale, siblings of the same name are found.
    run = tmp_path / "moved"
    (tmp_path / "made").rename(run)

    out = push_run(run, "me/tiny")

    order = ["me/tiny-pretrain", "me/tiny-sft", "me/tiny-rank", "me/tiny-reward", "me/tiny-ppo"]
    assert list(out) == order
    created = [p for m, p, _ in hub.requests if p.endswith("/commit/main")]
    assert created == [
        "/api/models/me/tiny-pretrain/commit/main",
        "/api/models/me/tiny-sft/commit/main",
        "/api/datasets/me/tiny-rank/commit/main",
        "/api/models/me/tiny-reward/commit/main",
        "/api/models/me/tiny-ppo/commit/main",
    ]
    pre = card_of(hub.files("me/tiny-pretrain"))
    assert pre.data.base_model is None  # from scratch
    assert "random initialization" in pre.text
    sft = card_of(hub.files("me/tiny-sft"))
    assert sft.data.base_model == "me/tiny-pretrain"
    assert f"[me/tiny-pretrain]({hub.url}/me/tiny-pretrain)" in sft.text
    rank = DatasetCard(hub.files("me/tiny-rank", "dataset")["README.md"].decode())
    assert "rank" in rank.data.tags and rank.data.base_model == "me/tiny-sft"
    assert hub.files("me/tiny-rank", "dataset")["rankings.jsonl"] == (run / "rank" / "rankings.jsonl").read_bytes()
    reward = card_of(hub.files("me/tiny-reward"))
    assert reward.data.base_model == "me/tiny-sft"
    assert reward.data.pipeline_tag == "text-classification" and "reward-model" in reward.data.tags
    assert reward.data.datasets == ["me/tiny-rank"]
    assert "AutoModelForSequenceClassification" in reward.text
    ppo = card_of(hub.files("me/tiny-ppo"))
    assert ppo.data.base_model == "me/tiny-sft"
    # Lineage, oldest first, and the reward model PPO optimized against.
    lineage = ppo.text[ppo.text.index("## Lineage") :]
    assert lineage.index("me/tiny-pretrain") < lineage.index("me/tiny-sft") < lineage.index("this repo")
    assert f"[me/tiny-reward]({hub.url}/me/tiny-reward)" in lineage


def test_push_run_failure_midway_reports_what_landed(online, monkeypatch, tmp_path, model_template):
    from align.hub.push import push_run

    root = tmp_path / "run"
    pre = make_stage(root, "pretrain", "pretrain", model_template, parent=None)
    make_stage(root, "sft", "sft", model_template, parent=stage_parent(pre))
    make_stage(root, "ppo", "ppo", model_template, parent=stage_parent(root / "sft"))
    with HubServer(tokens={TOKEN: "write"}, fail_commit={"me/tiny-sft": 500}) as server:
        url = server.url
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(AlignError) as e:
            push_run(root, "me/tiny")
        assert list(server.files("me/tiny-sft")) == []  # created, never committed to
    msg = str(e.value)
    assert "answered 500" in msg
    assert "no commit was created" in msg and "me/tiny-sft (main) is unchanged" in msg
    assert f"(1 of 3 stages): me/tiny-pretrain: {url}/me/tiny-pretrain/commit/" in msg
    assert "Not attempted: ppo" in msg


# Adapters, branches, LFS, push_to_hub


def test_adapter_pushed_as_adapter_with_its_base(hub, tmp_path, model_template):
    import torch
    from safetensors.torch import save_file

    from align.hub.upload import push_stage

    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template, parent=None)
    push_stage(pre, "me/tiny-pretrain")
    lora = tmp_path / "sft"
    lora.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_template / name, lora / name)
    adapter_config = {"peft_type": "LORA", "r": 4, "base_model_name_or_path": str(pre.resolve())}
    (lora / "adapter_config.json").write_text(json.dumps(adapter_config))
    save_file({"base_model.model.layers.0.lora_A.weight": torch.zeros(4, 16)}, lora / "adapter_model.safetensors")
    write_stage_info(lora, "sft", parent=stage_parent(pre), recipe={}, data=None, metrics={})

    push_stage(lora, "me/tiny-sft-lora")  # the parent's repo comes from pretrain's align_hub.json

    got = hub.files("me/tiny-sft-lora")
    assert got["adapter_model.safetensors"] == (lora / "adapter_model.safetensors").read_bytes()
    assert "model.safetensors" not in got
    # The uploaded adapter names its base on the Hub, so it loads anywhere; the local file is untouched.
    assert json.loads(got["adapter_config.json"])["base_model_name_or_path"] == "me/tiny-pretrain"
    assert json.loads((lora / "adapter_config.json").read_text()) == adapter_config
    card = card_of(got)
    assert card.data.library_name == "peft" and card.data.base_model == "me/tiny-pretrain"
    assert "AutoPeftModelForCausalLM" in card.text
    assert "training_curves.png" not in got  # no log_history, no curves, no broken image link
    assert "training_curves.png" not in card.text


def test_revision_commits_to_a_new_branch(hub, tmp_path, model_template):
    from align.hub.upload import push_stage

    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    push_stage(pre, "me/tiny", revision="exp/lr-3e-4", commit_message="try a lower lr", private=True)
    assert hub.files("me/tiny") == {}
    assert "config.json" in hub.files("me/tiny", branch="exp/lr-3e-4")
    assert hub.commits("me/tiny")[0]["summary"] == "try a lower lr"
    assert hub.repos[("model", "me/tiny")]["visibility"] == "private"


def test_lfs_upload_when_xet_is_off(hub, monkeypatch, tmp_path, model_template):
    from huggingface_hub import constants

    from align.hub.upload import push_stage

    # The server asks for LFS for weights; with Xet off the client uses the LFS batch API + PUT + verify.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_suffixes = (".safetensors",)
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    push_stage(pre, "me/tiny")
    assert hub.files("me/tiny")["model.safetensors"] == (pre / "model.safetensors").read_bytes()
    assert {"POST /{repo}.git/info/lfs/objects/batch", "PUT /_lfs/{oid}", "POST /_lfs/{oid}/verify"} <= hub.endpoints()


def test_push_after_stage_names_repo_like_trainer(hub, tmp_path, model_template):
    from align.hub.push import push_after_stage

    pre = make_stage(tmp_path, "tiny-pretrain", "pretrain", model_template)
    url = push_after_stage(pre, None, private=False, revision=None)
    # No namespace: the Hub puts it under the token's user (the server's "tester"), and the card says so.
    assert url.startswith(f"{hub.url}/tester/tiny-pretrain/commit/")
    assert 'model="tester/tiny-pretrain"' in hub.files("tester/tiny-pretrain")["README.md"].decode()


# Dry run and CLI


def test_dry_run_writes_the_folder_without_network_or_token(online, monkeypatch, tmp_path, model_template, capsys):
    from align.hub.push import main

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    pre = make_stage(tmp_path / "run", "pretrain", "pretrain", model_template)
    make_stage(tmp_path / "run", "sft", "sft", model_template, parent=stage_parent(pre))
    preview = tmp_path / "preview"

    assert main([str(tmp_path / "run"), "--repo_prefix", "me/tiny", "--dry_run", str(preview)]) == 0

    for name in ("pretrain", "sft"):
        got = {p.relative_to(preview / name).as_posix() for p in (preview / name).rglob("*") if p.is_file()}
        assert got == set(expected_files(tmp_path / "run" / name)) | {"README.md", "training_curves.png"}
    # The child's card already links the parent's planned repo.
    assert card_of({"README.md": (preview / "sft" / "README.md").read_bytes()}).data.base_model == "me/tiny-pretrain"
    out = capsys.readouterr().out
    assert "would push to http://127.0.0.1" in out and "me/tiny-sft" in out and "model.safetensors" in out
    assert not (tmp_path / "run" / "sft" / "align_hub.json").exists()  # nothing was pushed
    with pytest.raises(AlignError, match="not an empty dir"):
        main([str(tmp_path / "run" / "sft"), "--repo_id", "me/x", "--dry_run", str(preview)])


def test_cli_help_and_usage_errors(tmp_path, model_template, capsys):
    from align.hub.push import main

    assert main(["--help"]) == 0
    assert "--repo_prefix" in capsys.readouterr().out
    with pytest.raises(AlignError, match="one of the arguments --repo_id --repo_prefix is required"):
        main([str(tmp_path)])
    pre = make_stage(tmp_path / "run", "pretrain", "pretrain", model_template)
    with pytest.raises(AlignError, match="use --repo_prefix|push it with --repo_prefix"):
        main([str(tmp_path / "run"), "--repo_id", "me/x"])
    with pytest.raises(AlignError, match="push it with --repo_id"):
        main([str(pre), "--repo_prefix", "me/x"])


# Errors


@pytest.mark.parametrize("name", ["bad--name", "a/b/c", "-lead", "x" * 97])
def test_invalid_repo_name(online, tmp_path, model_template, name):
    from align.hub.upload import push_stage

    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    with pytest.raises(AlignError, match="not a valid Hub repo name"):
        push_stage(pre, name)


def test_no_token_says_how_to_log_in(online, monkeypatch, tmp_path, model_template):
    from align.hub.upload import push_stage

    monkeypatch.delenv("HF_TOKEN")
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    with pytest.raises(AlignError, match="no Hugging Face token") as e:
        push_stage(pre, "me/tiny")
    assert "hf auth login" in str(e.value) and "HF_TOKEN" in str(e.value)


def test_offline_mode_is_named(monkeypatch, tmp_path, model_template):
    from huggingface_hub import constants

    from align.hub.upload import push_stage

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    with pytest.raises(AlignError, match="HF_HUB_OFFLINE"):
        push_stage(pre, "me/tiny")


def test_connection_refused_names_the_endpoint(online, monkeypatch, tmp_path, model_template):
    from align.hub.upload import push_stage

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    with pytest.raises(AlignError, match="cannot reach the Hub") as e:
        push_stage(pre, "me/tiny")
    assert endpoint in str(e.value) and "nothing was pushed" in str(e.value)


def test_incomplete_stage_dirs(tmp_path, model_template):
    from align.hub.upload import push_stage

    unfinished = tmp_path / "unfinished"
    shutil.copytree(model_template, unfinished)  # weights but no align_stage.json: the stage did not finish
    with pytest.raises(AlignError, match="not a finished align stage"):
        push_stage(unfinished, "me/x")
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    (pre / "model.safetensors").unlink()
    (pre / "tokenizer_config.json").unlink()
    with pytest.raises(AlignError, match="missing model.safetensors, tokenizer_config.json"):
        push_stage(pre, "me/x")
    rank = make_stage(tmp_path, "rank", "rank", model_template)
    (rank / "rankings.jsonl").unlink()
    with pytest.raises(AlignError, match="missing data files"):
        push_stage(rank, "me/x")


def test_token_never_appears_in_logs_or_output(online, monkeypatch, tmp_path, model_template, caplog, capsys):
    from align.hub.push import main

    caplog.set_level(logging.DEBUG)
    pre = make_stage(tmp_path, "pretrain", "pretrain", model_template)
    with HubServer(tokens={TOKEN: "write", READ_TOKEN: "read"}, fail_commit={"me/fails": 500}) as server:
        url = server.url
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert main([str(pre), "--repo_id", "me/ok"]) == 0
        errors = {}
        for token, repo in [(BAD_TOKEN, "me/a"), (READ_TOKEN, "me/b"), (TOKEN, "me/fails")]:
            monkeypatch.setenv("HF_TOKEN", token)
            with pytest.raises(AlignError) as e:
                main([str(pre), "--repo_id", repo])
            errors[token] = str(e.value)
    assert "rejected the token (401 Unauthorized)" in errors[BAD_TOKEN] and "nothing was pushed" in errors[BAD_TOKEN]
    assert "may not write to me/b (403 Forbidden)" in errors[READ_TOKEN]
    assert "no commit was created" in errors[TOKEN] and "exists" in errors[TOKEN]
    out, err = capsys.readouterr()
    seen = "\n".join([caplog.text, out, err, *errors.values()])
    assert f"{url}/me/ok/commit/" in seen  # the output is there, so its absence of tokens means something
    for token in (TOKEN, READ_TOKEN, BAD_TOKEN):
        assert token not in seen


def test_push_to_hub_in_a_stage_recipe_pushes_the_finished_stage(hub, tmp_path):
    from align.config import parse_config
    from align.stages.pretrain import run

    recipe = {
        "model_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        "tinyworld_stories": 100, "max_length": 32, "max_steps": 2, "per_device_train_batch_size": 4,
        "eval_strategy": "no", "save_strategy": "no", "num_samples": 0, "report_to": "none",
        "output_dir": str(tmp_path / "pretrain"), "push_to_hub": True, "hub_model_id": "tester/tiny-pretrain",
    }
    out = run(parse_config("pretrain", [], overrides=recipe))
    files = hub.files("tester/tiny-pretrain")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert files["align_stage.json"] == (out / "align_stage.json").read_bytes()
    assert "pretrain" in card_of(files).data.tags  # our card, not Trainer's
    assert json.loads((out / "align_stage.json").read_text())["recipe"]["push_to_hub"] is True
