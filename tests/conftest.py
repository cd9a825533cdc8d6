import os

# The default suite never touches the network: the Hub is unreachable on CI and in tests by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402 - after the environment above, which must be set before anything imports datasets


@pytest.fixture
def isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' Arrow cache (and align's JSON cache under it) in a fresh folder, away from ~/.cache and others."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    datasets.disable_progress_bars()
