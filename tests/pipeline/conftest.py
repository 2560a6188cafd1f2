import pytest


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
    from pipeline.engines.tiny import ensure_tiny_model

    directory = tmp_path_factory.mktemp("omniq-cache")
    ensure_tiny_model(directory)
    return directory
