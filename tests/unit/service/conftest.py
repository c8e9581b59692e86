"""Fixtures for the service tests: a database per test (SQLite and, when configured, PostgreSQL)
and an app with a test client."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.unit.service.support import (
    DATABASES,
    database_url,
    dataset_bytes,
    make_settings,
    model_bytes,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Procrastinate runs on PostgreSQL only: the SQLite x procrastinate combinations of the
    queue tests are not collected at all (a skip there would count a test that cannot run)."""
    impossible = [
        item
        for item in items
        if (spec := getattr(item, "callspec", None)) is not None
        and spec.params.get("db_url") == "sqlite"
        and spec.params.get("queue") == "procrastinate"
    ]
    if impossible:
        config.hook.pytest_deselected(items=impossible)
        items[:] = [item for item in items if item not in impossible]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with database_url("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path, db_url: str) -> Settings:
    return make_settings(data_dir, db_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def ids(client: TestClient) -> dict[str, str]:
    """A build request's ``model_id`` and ``dataset_id``: the tiny CNN and 10 samples checked
    against it (8 calibrate, 2 evaluate)."""
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes(count=10))},
        data={"model_id": model["id"]},
    ).json()
    return {"model_id": model["id"], "dataset_id": dataset["id"]}


@pytest.fixture
def make_client(data_dir: Path, db_url: str) -> Iterator[Callable[..., TestClient]]:
    """Clients of apps with other settings (same database and data directory)."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: object) -> TestClient:
            app = create_app(make_settings(data_dir, db_url, **overrides))
            return stack.enter_context(TestClient(app))

        yield make
