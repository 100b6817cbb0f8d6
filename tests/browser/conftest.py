"""Fixtures for tests in a real browser (Chromium driven by Playwright) against real ComfyUI.

The browser is the system's Chromium (``/usr/bin/chromium``, Debian's package; another one with
COMFY_BROWSER), never one Playwright downloads.  Without Playwright or a Chromium these tests
fail with the command to run: a missing browser must not pass as skipped tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.comfy_e2e.conftest import comfy_env, comfy_python  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("COMFY_BROWSER") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: COMFY_BROWSER_ARTIFACTS, else a temporary folder (printed)."""
    chosen = os.environ.get("COMFY_BROWSER_ARTIFACTS")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {path}")
    return path


# Module scope: Playwright's sync API keeps an asyncio loop running in this thread while it is
# open, which makes every later asyncio.run() in the session fail; close it with the module.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("no playwright: pip install playwright==1.65.3 (into .venv)", pytrace=False)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()
