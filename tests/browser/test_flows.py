"""A person's flows through the dashboard, in chromium, against a real server with auth off:
upload a model and a dataset through the form, launch an INT8 build and watch its page reach
``succeeded`` without a reload, see its charts drawn, download the artifact (its sha256 as
shown), rank its nodes by sensitivity, compare it with an FP16 build, see a build that failed
its accuracy gate marked in the builds list; start a sweep and follow its Pareto chart."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.conftest import MISSING, context_options, needs_browser
from tests.integration.conftest import Server, running_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = needs_browser
expect = pytest.importorskip("playwright.sync_api", reason=str(MISSING)).expect

BUILD_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server("sqlite", tmp_path_factory.mktemp("browser")) as srv:
        yield srv


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(base_url=server.url, **context_options())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"script errors on the page: {errors}"


def _upload(page: Page, kind: str, path: Path, name: str = "", tags: str = "") -> str:
    """Pick ``path`` in the ``kind`` upload form (with a name and tags); the script uploads it
    with a progress bar and selects it in the build form. Returns its id."""
    form = page.locator(f"#{kind}-upload")
    page.fill(f"#{kind}-name", name)
    page.fill(f"#{kind}-tags", tags)
    form.locator("input[type=file]").set_input_files(str(path))
    expect(form).to_have_attribute("data-uploaded", re.compile(r"^[0-9a-f]{64}$"))
    expect(form.locator("progress")).to_have_js_property("value", 100)
    uploaded = form.get_attribute("data-uploaded") or ""
    expect(page.locator(f"#{kind}_id")).to_have_value(uploaded)
    return uploaded


def _submit(page: Page, precision: str, *, gate: str = "", method: str = "minmax") -> str:
    page.select_option("#precision", precision)
    page.select_option("#method", method)
    page.fill("#gate", gate)
    page.click("#submit-build")
    page.wait_for_url(re.compile(r"/builds/[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[-1]


def _watch_until(page: Page, status: str) -> None:
    """The build page reaches ``status`` through its event stream, without a reload."""
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#build-status [data-status]")).to_have_attribute(
        "data-status", status, timeout=BUILD_TIMEOUT_MS
    )
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"


def _chart_points(page: Page, name: str) -> int:
    canvas = page.locator(f'canvas[data-chart="{name}"]')
    expect(canvas).to_have_attribute("data-drawn", "true")
    return int(
        canvas.evaluate(
            "c => Chart.getChart(c).data.datasets.reduce((n, d) => n + d.data.filter(v => v !== null).length, 0)"
        )
    )


def test_upload_build_watch_compare_download_and_gate(page: Page, files: dict[str, Path]) -> None:
    page.goto("/builds/new")
    model_id = _upload(page, "model", files["model"], "tiny classifier", "vision, zoo")
    dataset_id = _upload(page, "dataset", files["dataset"])
    int8 = _submit(page, "int8")
    expect(page.locator("#timeline li")).to_have_count(4)
    _watch_until(page, "succeeded")

    # the results arrived in place: charts with data, accuracy per output, the calibration table
    expect(page.locator("#results h2")).to_have_text("Results")
    assert _chart_points(page, "latency") >= 7
    assert _chart_points(page, "accuracy") >= 2
    # the int8 default gate (sqnr_db >= 10) as a line across the whole chart, not a dash
    accuracy = page.locator('canvas[data-chart="accuracy"]')
    expect(accuracy).to_have_attribute("data-gate-line", re.compile(r"^\d+,\d+,\d+$"))
    left, right, _y = map(int, (accuracy.get_attribute("data-gate-line") or "").split(","))
    assert right - left >= 0.8 * accuracy.evaluate("c => Chart.getChart(c).width")
    assert _chart_points(page, "ranges") >= 1
    expect(page.locator("#calibration-table tbody tr, #calibration-table tr").first).to_be_visible()
    expect(page.locator("#timeline li.done")).to_have_count(4)
    assert "succeeded" in page.locator("#log").inner_text() or page.locator("#log").inner_text()

    # the artifact downloads with the sha256 the page shows
    shown = page.locator("#artifact-sha256").inner_text().strip()
    with page.expect_download() as download:
        page.click("#artifact-link")
    path = download.value.path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == shown

    # node sensitivity, computed on request: the section updates itself when the ranking lands
    page.click("#sensitivity-button")
    page.wait_for_url(re.compile(r"#sensitivity$"))
    chart = page.locator('canvas[data-chart="sensitivity"]')
    expect(chart).to_have_attribute("data-drawn", "true", timeout=BUILD_TIMEOUT_MS)
    assert _chart_points(page, "sensitivity") >= 1

    # an FP16 build of the same files (picked from the lists), then both side by side
    page.goto(f"/builds/new?model_id={model_id}&dataset_id={dataset_id}")
    expect(page.locator("#model_id")).to_have_value(model_id)
    fp16 = _submit(page, "fp16")
    _watch_until(page, "succeeded")
    page.goto("/")
    page.check(f'input[name=ids][value="{int8}"]')
    page.check(f'input[name=ids][value="{fp16}"]')
    page.click("#compare-form button")
    table = page.locator("#compare")
    expect(table).to_contain_text(int8[:12])
    expect(table).to_contain_text(fp16[:12])
    expect(table.locator("tr", has_text="latency p50")).to_contain_text("%")  # a delta
    assert _chart_points(page, "compare") >= 2

    # a build whose accuracy gate cannot pass is marked in the list, in words
    page.goto(f"/builds/new?model_id={model_id}&dataset_id={dataset_id}")
    gated = _submit(page, "int8", gate="sqnr_db:200", method="entropy")
    page.goto("/")  # the list follows the running build on its own
    page.evaluate("window.__sameDocument = true")
    row = page.locator(f'tr[data-build="{gated}"]')
    expect(row).to_contain_text("gated: accuracy gate failed", timeout=BUILD_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument === true"), "the list was reloaded"
    page.keyboard.press("Tab")  # keyboard first: the skip link
    assert page.evaluate("document.activeElement.getAttribute('href')") == "#main"
    page.goto(f"/builds/{gated}")
    expect(page.locator(".alert").first).to_contain_text("Accuracy gate failed")
    gated_chart = page.locator('canvas[data-chart="accuracy"]')
    expect(gated_chart).to_have_attribute("data-drawn", "true")
    assert "✗ fails gate" in gated_chart.evaluate("c => Chart.getChart(c).data.labels.flat()")
    page.goto("/")
    expect(page.locator(f'tr[data-build="{int8}"]')).not_to_contain_text("gated")
    page.goto("/?model=classifier&precision=fp16")
    expect(page.locator("#builds tbody tr")).to_have_count(1)
    expect(page.locator(f'tr[data-build="{fp16}"]')).to_contain_text("tiny classifier")
    page.goto("/models?tag=vision")
    expect(page.locator("#models")).to_contain_text("tiny_cnn.onnx")  # the file name under it
    page.goto("/models?tag=nlp")
    expect(page.locator("#models")).to_contain_text("No models")


def test_sweep_page_draws_its_pareto_front_linked_to_builds(
    page: Page, server: Server, files: dict[str, Path]
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        model = client.post("/v1/models", files={"file": ("tiny_cnn.onnx", files["model"].read_bytes())})
        data = client.post("/v1/datasets", files={"file": ("images.npz", files["dataset"].read_bytes())})
    model_id, dataset_id = model.json()["id"], data.json()["id"]
    page.goto("/sweeps")
    page.select_option("#sw-model", model_id)
    page.select_option("#sw-dataset", dataset_id)
    page.fill("#sw-variants", "fp32, int8")
    page.fill("#sw-name", "browser sweep")
    page.click("#sweep-form button[type=submit]")
    page.wait_for_url(re.compile(r"/sweeps/[0-9a-f]+$"))
    expect(page.locator("#points tbody tr, #points tr:has(td)")).to_have_count(2)
    chart = page.locator('canvas[data-chart="pareto"]')
    expect(chart).to_have_attribute("data-drawn", "true", timeout=BUILD_TIMEOUT_MS)
    hrefs = chart.evaluate("c => Chart.getChart(c).data.datasets.flatMap(d => d.data.map(p => p.href))")
    assert hrefs and all(re.fullmatch(r"/builds/[0-9a-f]+", h) for h in hrefs)
    expect(page.locator("#points")).to_contain_text("on the front")
    # keyboard: the chart names the table right under it, whose links highlight their point
    expect(page.locator("#sweep-live[data-refresh-s]")).to_have_count(0, timeout=BUILD_TIMEOUT_MS)
    chart = page.locator('canvas[data-chart="pareto"]')
    expect(chart).to_have_attribute("data-drawn", "true")
    assert chart.get_attribute("aria-describedby") == "pareto-desc"
    expect(page.locator("#pareto-desc")).to_contain_text("the table right under the chart")
    assert chart.evaluate("c => c.parentElement.nextElementSibling.id") == "points"
    expect(page.locator("#points caption")).to_contain_text("chart's points")
    first = page.locator("#points a[data-point]").first
    first.focus()
    expect(chart).to_have_attribute("data-highlighted", first.get_attribute("href") or "?")
    assert chart.evaluate("c => Chart.getChart(c).getActiveElements().length") == 1
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/builds/[0-9a-f]+$"))
