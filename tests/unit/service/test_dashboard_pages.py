"""The dashboard's pages, forms and page data, in-process: every page renders, forms refuse a
post without the CSRF token, a token sees only its project's builds, the new-build form
becomes the REST request, and long calibration tables are paged."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from calibrators.table import CalibrationTable
from engines.backends.base import BuildTarget
from service.api.auth import create_token
from service.dashboard.forms import build_request
from service.dashboard.views import CALIBRATION_PAGE_SIZE, calibration_page, summary_of
from service.db import Database
from service.queue.database import DatabaseQueue
from service.schemas import BuildPublic, Scope
from service.settings import Settings
from service.store import builds
from service.store.storage import Storage
from service.store.tables import store_table
from tests.unit.service.support import dataset_bytes, insert_build, login_form, model_bytes

PAGES = ["/", "/builds/new", "/compare", "/sweeps", "/models", "/datasets", "/tables", "/workers"]


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None, "the page's forms carry no CSRF token"
    return match.group(1)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_with_labelled_navigation(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 200, answer.text[:500]
    assert '<nav aria-label="Main">' in answer.text and 'href="#main"' in answer.text
    for field in re.findall(r'<(?:input|select|textarea) [^>]*id="([^"]+)"', answer.text):
        assert f'for="{field}"' in answer.text, f"{path}: #{field} has no label"


def test_static_files_are_served_with_the_chart_library_license(client: TestClient) -> None:
    chart = client.get("/static/chart.umd.min.js")
    assert chart.status_code == 200 and "Chart.js v4.5.1" in chart.text[:200]
    assert chart.headers["content-type"].startswith("text/javascript")
    assert "MIT License" in client.get("/static/chart.js-LICENSE.md").text
    assert client.get("/static/../routes.py").status_code == 404
    assert client.get("/static/routes.py").status_code == 404


def test_form_posts_need_the_csrf_token(client: TestClient) -> None:
    form = {"model_id": "0" * 64, "dataset_id": "0" * 64}
    refused = client.post("/ui/builds", data=form, follow_redirects=False)
    assert refused.status_code == 403 and "CSRF" in refused.text
    csrf = _csrf(client.get("/builds/new").text)  # also sets the nonce cookie
    forged = client.post("/ui/builds", data={**form, "csrf_token": csrf[:-2] + "xx"})
    assert forged.status_code == 403
    accepted = client.post("/ui/builds", data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert accepted.status_code == 404 and "No model with id" in accepted.text  # as /v1 answers
    upload = client.post("/ui/models", files={"file": ("m.onnx", b"x")})
    assert upload.status_code == 403


def test_the_sign_in_form_needs_its_csrf_token(
    make_client: Callable[..., TestClient], db_url: str
) -> None:
    secured = make_client(auth=True)
    db = Database(db_url)
    with db.session() as session:
        token = create_token(session, "reader", Scope.READ)[1]
    db.dispose()
    # a cross-site post (login CSRF: the victim signed in as the attacker) has no nonce cookie
    blind = secured.post("/login", data={"token": token}, follow_redirects=False)
    assert blind.status_code == 403 and "CSRF" in blind.text
    assert "trtforge_session" not in blind.headers.get("set-cookie", "")
    form = login_form(secured, token)
    assert "trtforge_csrf" in secured.cookies
    for forged in ("", form["csrf_token"][:-2] + "xx", "x" * 43):
        data = {**form, "csrf_token": forged}
        refused = secured.post("/login", data=data, follow_redirects=False)
        assert refused.status_code == 403, forged
        assert 'name="csrf_token"' in refused.text  # the form again, to submit from this page
    other = make_client(auth=True)
    stolen = other.post("/login", data=form, follow_redirects=False)  # another browser's token
    assert stolen.status_code == 403
    accepted = secured.post("/login", data=form, follow_redirects=False)
    assert accepted.status_code == 303 and "trtforge_session" in accepted.headers["set-cookie"]
    refused_page = make_client(auth=True).get("/models")  # a page's sign-in form carries one too
    assert refused_page.status_code == 401 and "trtforge_csrf" in refused_page.headers["set-cookie"]
    assert _csrf(refused_page.text)


def test_signing_in_goes_back_to_the_page_that_asked_and_nowhere_else(
    make_client: Callable[..., TestClient], db_url: str
) -> None:
    secured = make_client(auth=True)
    db = Database(db_url)
    with db.session() as session:
        token = create_token(session, "reader", Scope.READ)[1]
    db.dispose()
    asked = secured.get("/workers?x=1")
    assert asked.status_code == 401 and 'name="next" value="/workers?x=1"' in asked.text
    form = login_form(secured, token)
    back = secured.post("/login", data={**form, "next": "/workers?x=1"}, follow_redirects=False)
    assert back.status_code == 303 and back.headers["location"] == "/workers?x=1"
    for elsewhere in ("//evil.example/x", "https://evil.example/", "/\\evil.ex", "/ui/logout", ""):
        answer = secured.post("/login", data={**form, "next": elsewhere}, follow_redirects=False)
        assert answer.headers["location"] == "/", elsewhere
    wrong = secured.post("/login", data={**form, "token": "tfk_x", "next": "/tables"})
    assert wrong.status_code == 401 and 'name="next" value="/tables"' in wrong.text  # kept


def test_pages_show_only_the_tokens_project(
    make_client: Callable[..., TestClient], db_url: str
) -> None:
    db = Database(db_url)
    with db.session() as session:
        insert_build(session, "ours", status="succeeded")
        theirs = insert_build(session, "theirs", status="succeeded")
        theirs.project = "other"
        session.commit()
        _, token = create_token(session, "viewer", Scope.READ)
    db.dispose()
    secured = make_client(auth=True)
    headers = {"Authorization": f"Bearer {token}"}
    page = secured.get("/", headers=headers).text
    assert 'data-build="ours"' in page and 'data-build="theirs"' not in page
    assert secured.get("/builds/theirs", headers=headers).status_code == 404
    assert 'href="/builds/new"' not in page  # read-only: no launch buttons
    assert secured.get("/").status_code == 401  # no token, no session: the sign-in page
    short = secured.get("/builds/new?model_id=m", headers=headers)  # a read-only token: 403
    assert short.status_code == 403 and "this page needs &#39;build&#39;" in short.text
    assert '<nav aria-label="Main">' in short.text and 'id="build-form"' not in short.text
    assert 'href="/login?next=/builds/new%3Fmodel_id%3Dm"' in short.text  # another token
    again = secured.get("/login?next=/builds/new%3Fmodel_id%3Dm")
    assert 'name="next" value="/builds/new?model_id=m"' in again.text


def test_new_build_form_becomes_the_rest_request() -> None:
    body = build_request(
        {
            "model_id": "m",
            "dataset_id": "d",
            "eval_dataset_id": "e",
            "precision": "int8",
            "method": "percentile",
            "percentile": "99.9",
            "gate": "cosine:0.99, sqnr_db:20",
            "budget": "cosine:0.999",
            "keep_int8": "conv1\nre:head.*",
            "target_gpu": "sm_90",
            "target_labels": "vision, fast",
            "eval_fraction": "0.25",
        }
    )
    assert body.spec.precision.value == "int8"
    assert body.spec.calibration.percentile == 99.9
    assert body.spec.gate is not None and len(body.spec.gate.budgets) == 2
    assert body.spec.keep.int8 == ("conv1", "re:head.*")
    assert body.eval_dataset_id == "e" and str(body.accuracy_budget) == "cosine >= 0.999"
    assert body.target is not None and body.target.labels == ["fast", "vision"]
    assert body.accuracy.eval_fraction == 0.25
    plain = build_request({"model_id": "m", "dataset_id": "d"})
    assert plain.target is None and plain.spec.gate is None


def test_a_classifiers_291_tensors_are_paged_and_searchable() -> None:
    table = CalibrationTable(amax={f"layer{i}.out": 1.0 + i for i in range(291)}, method="minmax")
    first = calibration_page(table, "", 1)
    assert len(first.rows) == CALIBRATION_PAGE_SIZE and first.pages == 12 and first.total == 291
    assert len(first.chart["labels"]) == CALIBRATION_PAGE_SIZE
    last = calibration_page(table, "", 99)  # clamped to the last page
    assert last.page == 12 and len(last.rows) == 291 - 11 * CALIBRATION_PAGE_SIZE
    found = calibration_page(table, "LAYER29", 1)
    assert [r.name for r in found.rows] == ["layer29.out", *(f"layer{i}.out" for i in range(290, 291))]
    assert found.rows[0].method == "minmax" and found.matching == 2


def test_the_calibration_section_pages_and_searches_the_builds_table(
    client: TestClient, settings: Settings, db_url: str
) -> None:
    table = CalibrationTable(amax={f"layer{i}.out": 1.0 + i for i in range(291)}, method="minmax")
    db = Database(db_url)
    with db.session() as session:
        row = insert_build(session, "b1", status="succeeded")
        stored, _ = store_table(
            session,
            Storage(settings.data_dir),
            key="t" * 64,
            model_id=row.model_id,
            dataset_id=row.dataset_id,
            table=table,
            source="calibrated",
            missing=[],
        )
        row.table_id = stored.id
        session.commit()
    db.dispose()
    section = client.get("/builds/b1/calibration", params={"q": "LAYER29"})
    assert section.status_code == 200
    names = re.findall(r"<td><code>(layer\d+\.out)</code></td>", section.text)
    assert names == ["layer29.out", "layer290.out"]
    assert "<h1" not in section.text and 'id="log"' not in section.text  # the section, alone
    last = client.get("/builds/b1/calibration", params={"tpage": 99}).text  # clamped
    assert "layer290.out" in last and "layer0.out" not in last
    assert client.get("/builds/nope/calibration").status_code == 404


def test_the_compare_page_names_each_builds_model(client: TestClient, db_url: str) -> None:
    db = Database(db_url)
    with db.session() as session:
        for build_id in ("b1", "b2"):
            insert_build(session, build_id, status="succeeded")
        session.commit()
    db.dispose()
    page = client.get("/compare", params={"ids": "b1,b2"})
    assert page.status_code == 200
    assert page.text.count("m.onnx") >= 2
    assert client.get("/compare", params={"ids": "b1,nope"}).status_code == 404


def test_a_collapsed_output_and_a_failed_gate_are_named(client: TestClient, db_url: str) -> None:
    db = Database(db_url)
    with db.session() as session:
        build = builds.build_public(insert_build(session, "b1", status="succeeded"))
        session.commit()
    db.dispose()
    report = {
        "performance": {"latency": {"median_ms": 1.0, "p99_ms": 2.0}, "throughput_qps": 9.0},
        "accuracy": {"outputs": [{"min_cosine_similarity": 0.578, "sqnr_db": 3.0}]},
        "gate": {"gate": {"budgets": [{"metric": "cosine", "value": 0.99}]}, "passed": False},
    }
    summary = summary_of(BuildPublic.model_validate(build.model_dump()), report)
    assert summary.collapsed and summary.gate == "failed" and summary.p99_ms == 2.0


def test_a_refused_form_comes_back_filled_in_naming_the_field(client: TestClient) -> None:
    csrf = _csrf(client.get("/builds/new").text)
    form = {"csrf_token": csrf, "model_id": "m", "dataset_id": "d", "gate": "speed:9"}
    answer = client.post("/ui/builds", data=form, follow_redirects=False)
    assert answer.status_code == 422
    alert = re.search(r'<div class="alert" role="alert" id="form-error">(.*?)</div>', answer.text, re.S)
    assert alert is not None and "spec.gate" in alert.group(1)
    assert 'value="speed:9"' in answer.text  # what was typed stays
    sweep = client.post(
        "/ui/sweeps",
        data={"csrf_token": csrf, "model_id": "0" * 64, "dataset_id": "0" * 64, "variants": "fp64"},
    )
    assert sweep.status_code == 422 and "The sweep was not started" in sweep.text


def test_the_cancel_button_asks_to_cancel_the_build(client: TestClient, db_url: str) -> None:
    db = Database(db_url)
    with db.session() as session:
        insert_build(session, "waiting", status="queued")
        session.commit()
    db.dispose()
    page = client.get("/builds/waiting")
    assert page.status_code == 200 and 'id="cancel-form"' in page.text
    assert client.post("/ui/builds/waiting/cancel", data={}).status_code == 403  # no token
    answer = client.post(
        "/ui/builds/waiting/cancel", data={"csrf_token": _csrf(page.text)}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/builds/waiting"
    assert client.get("/v1/builds/waiting").json()["cancel_requested"]  # (it has no job row)
    again = client.get("/builds/waiting").text
    assert "Cancelling" in again and "Cancel requested" in again  # the button, the log


def _table_rows(page: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table id="{table_id}"[^>]*>(.*?)</table>', page, re.S)
    assert table is not None, f"no #{table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1).split("</thead>")[1], re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in row] for row in cells]


def test_workers_page_shows_the_queue_and_live_workers_per_target(
    client: TestClient, settings: Settings
) -> None:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    data = client.post(
        "/v1/datasets", files={"file": ("d.npz", dataset_bytes())}, data={"model_id": model["id"]}
    ).json()
    ids = {"model_id": model["id"], "dataset_id": data["id"]}
    for body in (
        ids,
        {**ids, "accuracy": {"seed": 1}},
        {**ids, "target": {"labels": ["vision"]}},
        {**ids, "spec": {"backend": "tensorrt"}, "target": {"gpu": "sm_90", "tensorrt": "10"}},
        {**ids, "target": {"gpu": "sm_120"}},  # no live worker has it
    ):
        assert client.post("/v1/builds", json=body).status_code == 202
    h100 = BuildTarget(
        backend="tensorrt", backend_version="10.13.0", compute_capability="9.0", device="H100"
    )
    cpu = BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")
    db = Database(settings.resolved_database_url)
    queue = DatabaseQueue(db, settings)
    queue.register_worker("gpu-worker", 1, [h100, cpu], ["vision"])
    queue.register_worker("cpu-worker", 1, [cpu])
    db.dispose()
    page = client.get("/workers").text
    assert "<strong>5</strong> build(s) waiting for a worker, service-wide" in page
    assert sorted(_table_rows(page, "queue-by-target")) == [
        ["auto", "any worker", "2", "2"],
        ["auto", "gpu sm_120", "1", "✗ none: waits until one starts"],
        ["auto", "labels vision", "1", "1"],
        ["tensorrt", "gpu sm_90; TensorRT 10", "1", "1"],
    ]
    assert _table_rows(page, "workers-by-target") == [
        ["onnxruntime", "1.22.0", "cpu", "cpu", "-", "1"],
        ["onnxruntime", "1.22.0", "cpu", "cpu", "vision", "1"],
        ["tensorrt", "10.13.0", "H100", "9.0", "vision", "1"],
    ]
    assert len(_table_rows(page, "workers")) == 2
