"""The browser tier: Playwright drives Debian's chromium (``apt-get install chromium``; never a
browser Playwright downloads) against a real ``trtforge serve``.

Skipped, saying why, only when chromium or the ``playwright`` package is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.unit.service.support import dataset_bytes, model_bytes

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install 'trtforge[dev]')"
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    return None


MISSING = _missing()
"""Why the tier cannot run here (None: it can)."""
needs_browser = [
    pytest.mark.browser,
    pytest.mark.skipif(MISSING is not None, reason=f"browser tier skipped: {MISSING}"),
]
"""``pytestmark`` of every module in this tier."""


# package scope, not session: Playwright's sync API keeps an event loop running in the main
# thread while it is open, and later tiers call asyncio.run() (the load tests)
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # uploads and page loads on a busy 2-core CI machine
    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or CHROMIUM)
    browser = playwright.chromium.launch(
        executable_path=str(executable), headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo's tiny CNN and 16 calibration images, as files a person would pick."""
    folder = tmp_path_factory.mktemp("files")
    model = folder / "tiny_cnn.onnx"
    model.write_bytes(model_bytes())
    data = folder / "images.npz"
    data.write_bytes(dataset_bytes(16))
    return {"model": model, "dataset": data}


def context_options(**more: Any) -> dict[str, Any]:
    return {"viewport": VIEWPORT, "accept_downloads": True, **more}
