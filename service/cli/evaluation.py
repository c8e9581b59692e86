"""The options ``trtforge submit`` (and ``trtforge sweeps submit``) share with ``trtforge
build``: ``--eval-data``, ``--labels``, ``--accuracy-budget``, ``--sensitivity``, and the
uploaded model's ``--name`` and ``--tag``; turned into the fields of ``POST /v1/builds``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from service.cli.progress import sample_progress

if TYPE_CHECKING:
    from calibrators.spec import PreprocessSpec
    from service.client import TrtforgeClient

__all__ = ["evaluation_options", "evaluation_request"]

F = TypeVar("F", bound=Callable[..., Any])


def _labels(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    from service.cli.engines import labels_from_file

    labels = labels_from_file(path)
    return None if labels is None else [int(v) for v in labels]


def evaluation_options(func: F) -> F:
    """``--eval-data``, ``--labels``, ``--accuracy-budget``, ``--sensitivity``, ``--name`` and
    ``--tag``: what ``trtforge submit`` sends besides the spec."""
    for option in reversed(
        (
            click.option(
                "--eval-data",
                type=click.Path(path_type=Path, exists=True, dir_okay=False),
                default=None,
                help="Separate evaluation samples (same --preprocess); then all of --data "
                "calibrates.",
            ),
            click.option(
                "--labels",
                type=click.Path(path_type=Path, exists=True, dir_okay=False),
                default=None,
                help=".npy of int labels, one per --eval-data sample (else per --data sample).",
            ),
            click.option(
                "--accuracy-budget",
                default=None,
                help="METRIC:VALUE, e.g. cosine:0.999: keep the most sensitive nodes out of INT8 "
                "until met.",
            ),
            click.option(
                "--sensitivity",
                is_flag=True,
                help="Also rank the quantizable nodes by INT8 sensitivity (GET "
                "/v1/builds/ID/sensitivity).",
            ),
            click.option("--name", default=None, help="A name for the uploaded model."),
            click.option(
                "--tag", "tags", multiple=True, help="A tag for the uploaded model (repeatable)."
            ),
        )
    ):
        func = option(func)
    return func


def evaluation_request(
    client: TrtforgeClient,
    model_id: str,
    options: dict[str, Any],
    preprocess: PreprocessSpec | None,
    *,
    quiet: bool,
) -> dict[str, Any]:
    """Upload ``--eval-data`` (checked against the model) and return the ``submit_build``
    keyword arguments the evaluation options stand for."""
    eval_data: Path | None = options.get("eval_data")
    eval_id = None
    if eval_data is not None:
        with sample_progress(f"uploading {eval_data.name}", enabled=not quiet, unit="B") as bar:
            eval_id = client.upload_dataset(
                eval_data, model_id=model_id, preprocess=preprocess, progress=bar
            ).id
    from service.schemas import SensitivityOptions

    return {
        "eval_dataset_id": eval_id,
        "labels": _labels(options.get("labels")),
        "accuracy_budget": options.get("accuracy_budget"),
        "sensitivity": SensitivityOptions() if options.get("sensitivity") else None,
    }
