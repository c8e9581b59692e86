"""``/healthz`` (the process answers), ``/readyz`` (database, storage, a live worker) and
``/metrics`` (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from core.errors import TrtforgeError
from service.api.deps import AppState, ReadAccess, SessionDep, StateDep
from service.api.metrics import render_metrics
from service.schemas import CheckResult, Readiness

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check(action: object) -> CheckResult:
    try:
        detail = action() if callable(action) else None
    except TrtforgeError as exc:
        return CheckResult(ok=False, detail=exc.message)
    except Exception as exc:
        return CheckResult(ok=False, detail=f"{type(exc).__name__}: {exc}")
    return CheckResult(ok=True, detail=str(detail) if detail is not None else "ok")


def readiness(state: AppState) -> Readiness:
    """Database reachable, data directory writable, at least one worker alive, and this
    process's own worker (when it runs one) with every slot alive and not failing."""
    checks = {
        "database": _check(state.db.ping),
        "storage": _check(state.storage.check),
    }
    if checks["database"].ok:
        checks["workers"] = _workers(state)
    else:
        checks["workers"] = CheckResult(ok=False, detail="unknown (database unreachable)")
    if state.worker is not None:  # this process's own worker: its slots must be alive and well
        checks["slots"] = CheckResult(ok=state.worker.healthy, detail=state.worker.health_detail())
    return Readiness(ready=all(c.ok for c in checks.values()), checks=checks)


def _workers(state: AppState) -> CheckResult:
    """At least one live worker that takes builds; the problems the others report."""
    try:
        live = state.queue.workers()
    except TrtforgeError as exc:
        return CheckResult(ok=False, detail=exc.message)
    except Exception as exc:
        return CheckResult(ok=False, detail=f"{type(exc).__name__}: {exc}")
    if not live:
        return CheckResult(ok=False, detail="no live worker; start `trtforge worker`")
    troubled = [f"{worker.id}: {worker.problem}" for worker in live if worker.problem]
    if len(troubled) == len(live):
        return CheckResult(ok=False, detail=f"no live worker takes builds ({'; '.join(troubled)})")
    detail = f"{len(live)} live worker(s)"
    if troubled:
        detail += f", {len(troubled)} of them taking no builds ({'; '.join(troubled)})"
    return CheckResult(ok=True, detail=detail)


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
def readyz(state: StateDep) -> JSONResponse:
    result = readiness(state)
    body = result.model_dump(mode="json")
    if not result.ready:
        failing = "; ".join(f"{name}: {c.detail}" for name, c in result.checks.items() if not c.ok)
        body["error"] = {
            "code": "unavailable",
            "message": f"Not ready: {failing}.",
            "hint": "Check the database URL, the data directory and the workers.",
        }
    return JSONResponse(body, status_code=200 if result.ready else 503)


@router.get("/metrics", operation_id="metrics", response_class=PlainTextResponse)
def metrics(state: StateDep, session: SessionDep, _: ReadAccess) -> PlainTextResponse:
    return PlainTextResponse(
        render_metrics(session, state.queue, state.counters),
        media_type="text/plain; version=0.0.4",
    )
