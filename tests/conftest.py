"""Settings shared by every test module."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_scan_cache(tmp_path_factory):
    """One scan cache for the whole run (subprocesses inherit it: the ComfyUI server, the webui hosts).

    The scan cache is keyed by the weights' fingerprint, so the ComfyUI tests, the Hub tests and the webui
    tab scanning the same organism pay for one scan instead of one each (an uncached scan is minutes on 2
    cores); the first test (FIRST, below) makes the one uncached scan. An SAU_CACHE already set is kept;
    the user's ~/.cache/sau is never written by the tests."""
    if os.environ.get("SAU_CACHE"):
        yield
        return
    os.environ["SAU_CACHE"] = str(tmp_path_factory.mktemp("sau-cache"))
    try:
        yield
    finally:
        os.environ.pop("SAU_CACHE", None)


# Runs first: its cold scan of the pixel organism fills the run's scan cache (shared_scan_cache) for the
# ComfyUI, webui and Hub tests that scan the same weights, so a full run pays for one uncached scan.
FIRST = "test_scan.py::test_scan_finds_the_zero_width_trigger_and_caches"


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(FIRST))  # stable: the rest keep their order
