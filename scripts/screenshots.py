"""The README's dashboard screenshots, taken by the browser tier's tooling: a real
``trtforge serve`` (the tests' ``Server``), the zoo's tiny CNN uploaded through the REST API,
an INT8, an FP16 and a gated INT8 build, then Debian's chromium driven by Playwright.

    python scripts/screenshots.py            # writes docs/img/dashboard-*.png
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402
from tests.integration.conftest import running_server  # noqa: E402
from tests.unit.service.support import dataset_bytes, model_bytes  # noqa: E402

OUT = ROOT / "docs" / "img"


def _wait(client: httpx.Client, build_id: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get(f"/v1/builds/{build_id}").json()["status"] in ("succeeded", "failed"):
            return
        time.sleep(0.5)
    raise SystemExit(f"build {build_id} did not finish in {timeout_s} s")


def _builds(client: httpx.Client) -> dict[str, str]:
    model = client.post("/v1/models", files={"file": ("tiny_cnn.onnx", model_bytes())}).json()
    data = client.post(
        "/v1/datasets",
        files={"file": ("images.npz", dataset_bytes(32))},
        data={"model_id": model["id"]},
    ).json()
    variants = {
        "int8": {"precision": "int8", "calibration": {"method": "minmax"}},
        "fp16": {"precision": "fp16"},
        "gated": {"precision": "int8", "calibration": {"method": "entropy"}, "gate": ["sqnr_db:200"]},
    }
    ids = {}
    for name, spec in variants.items():
        body = {"model_id": model["id"], "dataset_id": data["id"], "spec": spec}
        ids[name] = client.post("/v1/builds", json=body).json()["id"]
    for build_id in ids.values():
        _wait(client, build_id)
    return ids


def main() -> None:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, running_server("sqlite", Path(folder)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ids = _builds(client)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT, base_url=server.url)
            page.goto("/")
            page.screenshot(path=str(OUT / "dashboard-builds.png"))
            page.goto(f"/builds/{ids['int8']}")
            page.wait_for_selector('canvas[data-chart="accuracy"][data-drawn="true"]')
            top = page.evaluate("document.getElementById('results').getBoundingClientRect().top")
            # the results down to the accuracy chart and its gate line (taller than the window)
            clip = {"x": 0, "y": max(0, top - 8), "width": VIEWPORT["width"], "height": 1180}
            page.screenshot(path=str(OUT / "dashboard-build.png"), full_page=True, clip=clip)
            page.goto(f"/compare?ids={ids['int8']},{ids['fp16']}")
            page.wait_for_selector('canvas[data-chart="compare"][data-drawn="true"]')
            page.screenshot(path=str(OUT / "dashboard-compare.png"), full_page=True)
            browser.close()
    for name in ("builds", "build", "compare"):
        print(OUT / f"dashboard-{name}.png")


if __name__ == "__main__":
    main()
