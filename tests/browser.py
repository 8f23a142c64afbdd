"""Headless Chromium for the browser tests (Debian's `chromium`, driven by Playwright; never
`playwright install`). `.ci/run` installs the package, so in CI a missing browser is a failure, not a skip."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# without the background-networking flags Chromium keeps dialling out, and this machine refuses every try
LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-gpu", "--no-first-run"]


def require_chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian chromium is not installed (.ci/run installs it: apt-get install chromium)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def launch(playwright):
    return playwright.chromium.launch(executable_path=require_chromium(), headless=True, args=LAUNCH_ARGS)
