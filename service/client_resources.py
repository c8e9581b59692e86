"""The client's calls for sweeps, sensitivity and catalog edits (``TrtforgeClient`` inherits
them): :class:`ResourcesMixin`. Light like :mod:`service.client`: httpx and the wire only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.errors import WaitTimeoutError
from service.schemas import (
    CatalogPatch,
    DatasetPublic,
    ModelPublic,
    SensitivityOptions,
    SensitivityPublic,
    SweepCreate,
    SweepPage,
    SweepPublic,
)

__all__ = ["ResourcesMixin"]

M = TypeVar("M", bound=BaseModel)


class ResourcesMixin:
    """Sweeps (``/v1/sweeps``), sensitivity (``/v1/builds/{id}/sensitivity``) and names/tags
    (``PATCH /v1/models/{id}``, ``PATCH /v1/datasets/{id}``)."""

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        raise NotImplementedError  # TrtforgeClient's

    def _get(self, path: str, model: type[M], **params: Any) -> M:
        raise NotImplementedError  # TrtforgeClient's

    # -- names and tags ----------------------------------------------------------------------

    def update_model(self, model_id: str, **changes: Any) -> ModelPublic:
        """Set (or, with None, clear) ``name`` and/or ``tags``; what is not given stays."""
        body = CatalogPatch.model_validate(changes).model_dump(mode="json", exclude_unset=True)
        response = self._request("PATCH", f"/v1/models/{model_id}", json=body)
        return ModelPublic.model_validate_json(response.content)

    def update_dataset(self, dataset_id: str, **changes: Any) -> DatasetPublic:
        """Set (or, with None, clear) ``name`` and/or ``tags``; what is not given stays."""
        body = CatalogPatch.model_validate(changes).model_dump(mode="json", exclude_unset=True)
        response = self._request("PATCH", f"/v1/datasets/{dataset_id}", json=body)
        return DatasetPublic.model_validate_json(response.content)

    # -- sensitivity -------------------------------------------------------------------------

    def request_sensitivity(
        self, build_id: str, options: SensitivityOptions | None = None
    ) -> SensitivityPublic:
        """Rank the build's quantizable nodes on a worker (the build's request run again with
        ``sensitivity``, unless it asked for it itself)."""
        body = (options or SensitivityOptions()).model_dump(mode="json")
        response = self._request("POST", f"/v1/builds/{build_id}/sensitivity", json=body)
        return SensitivityPublic.model_validate_json(response.content)

    def get_sensitivity(self, build_id: str) -> SensitivityPublic:
        return self._get(f"/v1/builds/{build_id}/sensitivity", SensitivityPublic)

    # -- sweeps ------------------------------------------------------------------------------

    def create_sweep(self, request: SweepCreate) -> SweepPublic:
        """Queue one build per variant and return the sweep."""
        body = request.model_dump(mode="json", exclude_unset=True)
        response = self._request("POST", "/v1/sweeps", json=body)
        return SweepPublic.model_validate_json(response.content)

    def get_sweep(self, sweep_id: str) -> SweepPublic:
        return self._get(f"/v1/sweeps/{sweep_id}", SweepPublic)

    def list_sweeps(
        self, *, model_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> SweepPage:
        return self._get("/v1/sweeps", SweepPage, model_id=model_id, limit=limit, offset=offset)

    def delete_sweep(self, sweep_id: str) -> None:
        self._request("DELETE", f"/v1/sweeps/{sweep_id}")

    def wait_sweep(
        self,
        sweep_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[SweepPublic], None] | None = None,
    ) -> SweepPublic:
        """Poll until every build of the sweep has ended; raises :class:`WaitTimeoutError`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            sweep = self.get_sweep(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.status.terminal:
                return sweep
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise WaitTimeoutError(f"Sweep {sweep_id} did not end within {timeout_s} s.")
            time.sleep(poll_s)
