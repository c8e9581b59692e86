"""Submission checks of what a build measures on: its datasets against its model, its separate
evaluation set, labels, accuracy budget and sensitivity (``POST /v1/builds``, ``POST
/v1/sweeps``).

Everything is decided from the rows (the datasets' recorded per-sample specs, the model's
inputs), so a request that cannot run is refused with 422 naming the field and the fix before it
is queued, instead of failing later in a worker. The worker validates the samples themselves
again (values, finiteness) when it opens them.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from calibrators.errors import DatasetError
from core.tensors import TensorSpec
from engines.accuracy_report import AccuracyMetric
from engines.errors import SpecError
from service.db.models import DatasetRow, ModelRow
from service.schemas import BuildCreate
from service.store.catalog import get_dataset

__all__ = ["check_dataset_fits", "check_evaluation"]

_LABELLED = (AccuracyMetric.ACCURACY, AccuracyMetric.ACCURACY_DROP)
"""Metrics measured against true labels."""


def check_evaluation(
    session: Session,
    request: BuildCreate,
    model: ModelRow,
    dataset: DatasetRow,
    inputs: Sequence[TensorSpec],
) -> DatasetRow | None:
    """Refuse a request whose data cannot feed the model, or that asks for a measurement its
    data cannot give; the evaluation dataset's row when one is named."""
    check_dataset_fits(dataset, model, inputs, field="dataset_id")
    evaluation = None
    if request.eval_dataset_id is not None:
        evaluation = get_dataset(
            session, request.eval_dataset_id, field="eval_dataset_id", project=model.project
        )
        check_dataset_fits(evaluation, model, inputs, field="eval_dataset_id")
    _check_labels(request, dataset, evaluation)
    _check_measurements(request, dataset, evaluation)
    return evaluation


def check_dataset_fits(
    dataset: DatasetRow, model: ModelRow, inputs: Sequence[TensorSpec], *, field: str
) -> None:
    """The dataset's samples have the model's input names (one array feeds a one-input model
    whatever its name), ranks, static dims and a dtype that converts to the model's without
    loss. :class:`DatasetError` with ``field`` and the fix otherwise."""
    if dataset.model_id == model.id:
        return  # validated against this model, sample by sample, at upload
    have = {str(t["name"]): t for t in dataset.inputs}
    wanted = {spec.name: spec for spec in inputs}
    if len(have) == 1 and len(wanted) == 1:
        have = {next(iter(wanted)): next(iter(have.values()))}
    if set(have) != set(wanted):
        raise DatasetError(
            f"Dataset {dataset.id[:12]} ({dataset.filename}) has inputs "
            f"{', '.join(sorted(have))}; model {model.id[:12]} ({model.filename}) takes "
            f"{', '.join(sorted(wanted))}.",
            hint=_fix(model, "one array per model input, named after it"),
            field=field,
        )
    for name, spec in wanted.items():
        _check_input(dataset, model, name, have[name], spec, field)


def _check_input(
    dataset: DatasetRow,
    model: ModelRow,
    name: str,
    sample: dict[str, object],
    spec: TensorSpec,
    field: str,
) -> None:
    shape = sample.get("shape")
    dims = list(spec.shape)
    if isinstance(shape, list) and dims:
        fits = len(dims) == len(shape) + 1 and all(
            not isinstance(want, int) or not isinstance(got, int) or want == got
            for want, got in zip(dims[1:], shape, strict=True)
        )
        if not fits:
            wanted = ", ".join(str(d) if isinstance(d, int) else "?" for d in dims[1:])
            raise DatasetError(
                f"Dataset {dataset.id[:12]} ({dataset.filename}): input {name!r} samples are "
                f"shaped {shape}; model {model.id[:12]} takes [batch, {wanted}].",
                hint=_fix(model, "samples along the first axis, each shaped like the input "
                "without its batch axis"),
                field=field,
            )
    source, target = str(sample.get("dtype", "")), spec.dtype
    if source and not _converts(source, target):
        raise DatasetError(
            f"Dataset {dataset.id[:12]} ({dataset.filename}): input {name!r} holds {source}; "
            f"model {model.id[:12]} takes {target}, and the cast would lose information.",
            hint=_fix(model, f"{name!r} stored as {target}"),
            field=field,
        )


def _converts(source: str, target: str) -> bool:
    """Whether samples of ``source`` reach ``target`` as the worker converts them: any float to
    any float (rounded), integers to integers or floats (checked value by value there)."""
    if source == target:
        return True
    integers = ("int", "uint", "bool")
    src_float, dst_float = source.startswith("float"), target.startswith("float")
    src_int, dst_int = source.startswith(integers), target.startswith(integers)
    return (src_float and dst_float) or (src_int and (dst_int or dst_float))


def _fix(model: ModelRow, what: str) -> str:
    return (
        f"Upload a dataset with {what} (POST /v1/datasets with the form field "
        f"model_id={model.id[:12]}... checks it against the model at upload)."
    )


def _check_labels(
    request: BuildCreate, dataset: DatasetRow, evaluation: DatasetRow | None
) -> None:
    labelled = evaluation or dataset
    if request.labels is not None and len(request.labels) != labelled.num_samples:
        which = "eval_dataset_id" if evaluation is not None else "dataset_id"
        raise DatasetError(
            f"{len(request.labels)} labels for {labelled.num_samples} samples of {which} "
            f"{labelled.id[:12]}.",
            hint=f"Send one label per sample of {which}, in the dataset's order.",
            field="labels",
        )
    gate = request.spec.gate.budgets if request.spec.gate is not None else ()
    metrics = [("spec.gate", budget.metric) for budget in gate]
    if request.accuracy_budget is not None:
        metrics.append(("accuracy_budget", request.accuracy_budget.metric))
    if request.sensitivity is not None:
        metrics.append(("sensitivity.metric", request.sensitivity.metric))
    for field, metric in metrics:
        if metric in _LABELLED and request.labels is None:
            raise SpecError(
                f"{field} measures {metric.value}, which needs the samples' true labels.",
                hint="Send labels (one integer class per evaluation sample), or measure "
                "top1_agreement against FP32 instead.",
                field="labels",
            )


def _check_measurements(
    request: BuildCreate, dataset: DatasetRow, evaluation: DatasetRow | None
) -> None:
    asked = [
        name
        for name, wanted in (
            ("accuracy_budget", request.accuracy_budget is not None),
            ("sensitivity", request.sensitivity is not None),
        )
        if wanted
    ]
    if not asked:
        return
    precision = request.spec.precision
    if not precision.uses_int8:
        raise SpecError(
            f"{asked[0]} chooses nodes to keep out of INT8, but spec.precision is "
            f"{precision.value}.",
            hint='Ask for spec.precision "int8" or "int8-fp16".',
            field=asked[0],
        )
    if evaluation is not None:
        return
    accuracy = request.accuracy
    if not accuracy.enabled:
        raise SpecError(
            f"{asked[0]} is measured on held-out samples, but accuracy.enabled is false.",
            hint="Set accuracy.enabled true, or send eval_dataset_id.",
            field="accuracy.enabled",
        )
    if accuracy.eval_fraction == 0 or dataset.num_samples < 2:
        raise SpecError(
            f"{asked[0]} needs held-out samples: accuracy.eval_fraction is "
            f"{accuracy.eval_fraction} of {dataset.num_samples} sample(s).",
            hint="Raise accuracy.eval_fraction (e.g. 0.2) with at least 2 samples, or send "
            "eval_dataset_id.",
            field="accuracy.eval_fraction",
        )
