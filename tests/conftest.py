import os

# The default suite never touches the network: the Hub is unreachable on CI and in tests by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402 - after the environment above, which must be set before anything imports datasets
from browser import chromium  # noqa: E402, F401 - the headless-browser fixture (tests/browser.py), for every test


@pytest.fixture(autouse=True)
def isolated_align_cache(tmp_path_factory, monkeypatch):
    """align's own cache (gold evaluations of a fixed model) in a fresh folder per test, never ~/.cache: a test must
    not read what another stored. Subprocesses inherit it through the environment."""
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path_factory.mktemp("align_cache")))


@pytest.fixture
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' Arrow cache (and align's JSON cache under it) in a fresh folder, away from ~/.cache and others."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    datasets.disable_progress_bars()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package `align_fake_models` (on sys.path) shipping `tiny.gguf` and `sub/w.safetensors`, whose
    `__init__` raises: a `package:` reference must find its files without importing it."""
    root = tmp_path / "site" / "align_fake_models"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("raise ImportError('align_fake_models must not be imported')\n")
    (root / "tiny.gguf").write_bytes(b"GGUF")
    (root / "sub" / "w.safetensors").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return root
