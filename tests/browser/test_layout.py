"""Every dashboard page with the keyboard only, at 1280 px and on a 1366x768 laptop screen: no
page scrolls sideways, the first Tab reaches the skip link and it moves the focus into the page,
and every element Tab reaches shows where the focus is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.conftest import MISSING, context_options, needs_browser
from tests.integration.conftest import Server, running_server
from tests.unit.service.support import dataset_bytes, model_bytes

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = needs_browser
pytest.importorskip("playwright.sync_api", reason=str(MISSING))

SCREENS = [{"width": 1280, "height": 900}, {"width": 1366, "height": 768}]
PAGES = [
    "/",
    "/builds/new",
    "/builds/{gated}",
    "/compare?ids={int8},{gated}",
    "/sweeps",
    "/models",
    "/models/{model}",
    "/datasets",
    "/datasets/{dataset}",
    "/tables",
    "/workers",
]
TABS = 30
FOCUSED = """() => {
  const e = document.activeElement;
  if (!e || e === document.body) return null;
  const style = getComputedStyle(e);
  return {
    what: e.tagName + " " + (e.textContent || e.getAttribute("name") || "").trim().slice(0, 30),
    ring: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2,
    inMain: !!e.closest("main"),
  };
}"""


def _wait(client: httpx.Client, build_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/builds/{build_id}").json()["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"build {build_id} did not end"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server with an INT8 build and one that failed its accuracy gate."""
    with running_server("sqlite", tmp_path_factory.mktemp("layout")) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            model = client.post("/v1/models", files={"file": ("tiny_cnn.onnx", model_bytes())})
            data = client.post(
                "/v1/datasets",
                files={"file": ("images.npz", dataset_bytes(16))},
                data={"model_id": model.json()["id"]},
            )
            ids = {"model": model.json()["id"], "dataset": data.json()["id"]}
            for name, spec in (
                ("int8", {"precision": "int8", "calibration": {"method": "minmax"}}),
                ("gated", {"precision": "int8", "gate": ["sqnr_db:200"]}),
            ):
                body = {"model_id": ids["model"], "dataset_id": ids["dataset"], "spec": spec}
                ids[name] = client.post("/v1/builds", json=body).json()["id"]
            for name in ("int8", "gated"):
                _wait(client, ids[name])
        yield server, ids


@pytest.mark.parametrize("screen", SCREENS, ids=lambda s: f"{s['width']}x{s['height']}")
def test_every_page_fits_the_screen_and_shows_the_keyboard_focus(
    browser: Browser, site: tuple[Server, dict[str, str]], screen: dict[str, int]
) -> None:
    server, ids = site
    context = browser.new_context(base_url=server.url, **context_options(viewport=screen))
    page = context.new_page()
    try:
        for path in (p.format(**ids) for p in PAGES):
            page.goto(path)
            page.wait_for_load_state("load")
            sideways = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert sideways <= 0, f"{path} scrolls sideways by {sideways} px at {screen}"
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.getAttribute('href')") == "#main", path
            assert page.evaluate(FOCUSED)["ring"], f"{path}: the skip link shows no focus"
            page.keyboard.press("Enter")
            page.keyboard.press("Tab")
            first = page.evaluate(FOCUSED)
            # the skip link lands in the page (pages without a control there wrap to the top)
            assert first is not None and (first["inMain"] or path == "/workers"), (path, first)
            for _ in range(TABS):
                focused = page.evaluate(FOCUSED)
                if focused is None:
                    break
                assert focused["ring"], f"{path}: {focused['what']!r} has the focus but no ring"
                page.keyboard.press("Tab")
    finally:
        context.close()
