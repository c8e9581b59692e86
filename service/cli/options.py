"""What every `trtforge` command shares: the error handler, the options defined once, and the
build spec options with the one function that turns them into a :class:`BuildSpec`.

**Spec options.** Each option of :func:`spec_options` stands for one field of
:class:`engines.spec.BuildSpec` (:data:`SPEC_FIELD_OPTIONS`). :func:`spec_request` turns their
values into the ``spec`` object that ``POST /v1/builds`` takes (the same field names), and
:func:`spec_from_options` validates it with the same pydantic model the API validates with, so
``trtforge build``, ``trtforge submit`` and the REST API accept the same specs and refuse the
same mistakes; an error names the option and the field, in one line.

**Choices** come from the enums that define the values (:func:`enum_choice`): a new member is
offered by every command at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from pydantic import ValidationError

from calibrators.spec import CalibrationMethod, HistogramMode
from core.errors import TrtforgeError
from engines.errors import SpecError
from engines.gate import DEFAULT_THRESHOLDS
from engines.names import BackendName
from engines.spec import (
    BuildSpec,
    Precision,
    ShapeProfile,
    TechniqueMode,
    TensorRTMode,
    TensorRTOptions,
)

__all__ = [
    "SPEC_FIELDS_NOT_OFFERED",
    "SPEC_FIELD_OPTIONS",
    "backend_option",
    "calibration_batch_option",
    "enum_choice",
    "fail",
    "handle_errors",
    "max_samples_option",
    "memory_limit_option",
    "preprocess_option",
    "spec_from_options",
    "spec_options",
    "spec_request",
    "threads_option",
]

P = ParamSpec("P")
R = TypeVar("R")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def fail(message: str, hint: str = "") -> NoReturn:
    """Print one clear line (plus a hint line) on stderr and exit non-zero."""
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    raise SystemExit(2)


def enum_choice(enum: type[StrEnum]) -> click.Choice[str]:
    """A choice of ``enum``'s values, in its order."""
    return click.Choice([member.value for member in enum])


# -- the build spec options, one field of BuildSpec each ------------------------------------------

_DEFAULT = BuildSpec()

precision_option = click.option(
    "--precision",
    type=enum_choice(Precision),
    default=_DEFAULT.precision.value,
    show_default=True,
    help="int8-fp16: INT8 where calibrated, FP16 for the rest.",
)
method_option = click.option(
    "--method",
    type=enum_choice(CalibrationMethod),
    default=_DEFAULT.calibration.method.value,
    show_default=True,
    help="Calibration method; auto picks per tensor the candidate range (entropy, minmax, "
    "percentiles, mse) with the least error at the layers reading it.",
)
percentile_option = click.option(
    "--percentile",
    type=float,
    default=None,
    help="For --method percentile: percent of |x| kept below the range, in (0, 100] "
    "(default 99.99).",
)
num_quant_bins_option = click.option(
    "--num-quant-bins",
    type=int,
    default=None,
    help="For --method entropy, mse and auto: quantization levels of |x| (default 128, INT8).",
)
auto_samples_option = click.option(
    "--auto-samples",
    type=int,
    default=None,
    help="For --method auto: samples its candidates are measured on, 1..4096 (default: an "
    "eighth of the calibration samples, 4 to 16).",
)
histogram_option = click.option(
    "--histogram",
    type=enum_choice(HistogramMode),
    default=_DEFAULT.histogram.value,
    show_default=True,
    help="exact: independent of batch order; tensorrt: TensorRT's range-doubling histogram.",
)
backend_option = click.option(
    "--backend",
    type=enum_choice(BackendName),
    default=_DEFAULT.backend.value,
    show_default=True,
    help="auto: TensorRT where it can run (installed, NVIDIA GPU), else ONNX Runtime.",
)
mode_option = click.option(
    "--mode",
    type=enum_choice(TensorRTMode),
    default=_DEFAULT.mode.value,
    show_default=True,
    help="TensorRT: explicit Q/DQ (10.x and 11.x) or implicit calibration (10.x only).",
)
shapes_option = click.option(
    "--shapes",
    multiple=True,
    help="NAME:MIN/OPT/MAX optimization profile of a dynamic input (repeatable), e.g. "
    "input:1x3x224x224/8x3x224x224/32x3x224x224.",
)
keep_option = click.option(
    "--keep",
    multiple=True,
    help="Node name, op type or re:REGEX kept out of INT8 (repeatable).",
)
keep_fp16_option = click.option(
    "--keep-fp16",
    multiple=True,
    help="Node name, op type or re:REGEX kept out of FP16, in FP32 (repeatable).",
)
quantize_attention_option = click.option(
    "--quantize-attention",
    is_flag=True,
    default=_DEFAULT.quantize_attention,
    help="INT8 also for attention cores, GEMV-shaped MatMuls, LayerNormalization and GELU "
    "(kept in higher precision by default).",
)
gate_option = click.option(
    "--gate",
    multiple=True,
    help="Accuracy gate METRIC:VALUE against FP32 on the held-out samples (repeatable), or "
    "'none'. Default: the precision's ("
    + ", ".join(f"{kind.upper()}: {' '.join(v)}" for kind, v in DEFAULT_THRESHOLDS.items())
    + ").",
)
smoothing_option = click.option(
    "--smoothing",
    type=enum_choice(TechniqueMode),
    default=_DEFAULT.smoothing.value,
    show_default=True,
    help="SmoothQuant / cross-layer equalization before calibration (auto: where it lowers the "
    "INT8 error).",
)
bias_correction_option = click.option(
    "--bias-correction",
    type=enum_choice(TechniqueMode),
    default=_DEFAULT.bias_correction.value,
    show_default=True,
    help="Shift quantized layers' biases by their weights' mean error (auto: where it helps).",
)

SPEC_FIELD_OPTIONS: dict[str, tuple[Decorator, ...]] = {
    "precision": (precision_option,),
    "calibration": (method_option, percentile_option, num_quant_bins_option, auto_samples_option),
    "histogram": (histogram_option,),
    "backend": (backend_option,),
    "mode": (mode_option,),
    "profiles": (shapes_option,),
    "keep": (keep_option, keep_fp16_option),
    "quantize_attention": (quantize_attention_option,),
    "gate": (gate_option,),
    "smoothing": (smoothing_option,),
    "bias_correction": (bias_correction_option,),
}
"""BuildSpec field -> the options that set it, in the order ``--help`` lists them."""

SPEC_FIELDS_NOT_OFFERED = tuple(
    name for name, field in BuildSpec.model_fields.items() if field.annotation is TensorRTOptions
)
"""BuildSpec fields the command line leaves at their defaults (REST only): TensorRT's builder
options."""

_PLAIN_FIELDS = (
    "precision",
    "histogram",
    "backend",
    "mode",
    "quantize_attention",
    "smoothing",
    "bias_correction",
)
"""Fields set by one option of the field's name, taking the field's value as it is."""
_CALIBRATION_PARAMETERS = {
    "method": "method",
    "percentile": "percentile",
    "num_quant_bins": "num_quant_bins",
    "samples": "auto_samples",
}
"""MethodSpec field -> command parameter."""
_KEEP_PARAMETERS = {"int8": "keep", "fp16": "keep_fp16"}
"""KeepRules field -> command parameter."""

_SPEC_PARAMETERS: dict[str, tuple[str, ...]] = {
    **{field: (field,) for field in _PLAIN_FIELDS},
    "calibration": tuple(_CALIBRATION_PARAMETERS.values()),
    "profiles": ("shapes",),
    "keep": tuple(_KEEP_PARAMETERS.values()),
    "gate": ("gate",),
}
"""BuildSpec field -> the command parameters of its options (click's names)."""

_OPTION_NAMES: dict[tuple[str, ...], str] = {
    ("calibration",): "--method",
    ("calibration", "method"): "--method",
    ("calibration", "percentile"): "--percentile",
    ("calibration", "num_quant_bins"): "--num-quant-bins",
    ("calibration", "samples"): "--auto-samples",
    ("profiles",): "--shapes",
    ("keep",): "--keep",
    ("keep", "int8"): "--keep",
    ("keep", "fp16"): "--keep-fp16",
}
"""Where an option's name is not its field's name with dashes."""


def spec_request(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``spec`` object of ``POST /v1/builds`` that spec option values stand for.

    ``values`` maps command parameters (``precision``, ``method``, ``percentile``, ``keep_fp16``,
    ...) to what click parsed; a parameter that is absent, None or empty is left out, so the
    model's default applies. :class:`SpecError` for a ``--shapes`` text that is not
    ``NAME:MIN/OPT/MAX``; everything else is checked by :func:`spec_from_options`.
    """
    given = {name: value for name, value in values.items() if value is not None and value != ()}
    request: dict[str, Any] = {name: given[name] for name in _PLAIN_FIELDS if name in given}
    calibration = {
        field: given[name] for field, name in _CALIBRATION_PARAMETERS.items() if name in given
    }
    if calibration:
        calibration.setdefault("method", _DEFAULT.calibration.method.value)
        request["calibration"] = calibration
    if "shapes" in given:
        request["profiles"] = _profiles(given["shapes"])
    keep = {rule: list(given.get(name, ())) for rule, name in _KEEP_PARAMETERS.items()}
    if any(keep.values()):
        request["keep"] = keep
    if "gate" in given:
        request["gate"] = list(given["gate"])
    return request


def _profiles(items: Collection[str]) -> dict[str, dict[str, list[int]]]:
    profiles: dict[str, dict[str, list[int]]] = {}
    for item in items:
        name, sep, text = item.rpartition(":")
        if not sep or not name:
            raise SpecError(
                f"--shapes {item!r} needs NAME:MIN/OPT/MAX.",
                hint="e.g. --shapes input:1x3x224x224/8x3x224x224/32x3x224x224",
                field="profiles",
            )
        if name in profiles:
            raise SpecError(
                f"--shapes names the input {name!r} twice.",
                hint="Give one profile per input.",
                field=f"profiles.{name}",
            )
        try:
            profile = ShapeProfile.parse(text)
        except ValidationError as exc:
            raise _validation_error(exc, prefix=("profiles", name)) from exc
        except ValueError as exc:
            raise SpecError(
                f"--shapes {item!r}: {exc}",
                hint="e.g. --shapes input:1x3x224x224/8x3x224x224/32x3x224x224",
                field=f"profiles.{name}",
            ) from exc
        profiles[name] = {key: list(dims) for key, dims in profile.model_dump().items()}
    return profiles


def spec_from_options(
    values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> BuildSpec:
    """A :class:`BuildSpec` from spec option values (:func:`spec_request`), over ``defaults``
    (spec fields a command fixes), validated by the model ``POST /v1/builds`` validates with.

    :class:`SpecError` naming the option and the field (the API's dotted name, e.g.
    ``calibration.percentile``) for the first problem.
    """
    request = {**(defaults or {}), **spec_request(values)}
    try:
        return BuildSpec.model_validate(request)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> SpecError:
    """The first error pydantic found, as one line: the option, the field, what is wrong."""
    first = exc.errors()[0]
    loc = (*prefix, *(str(part) for part in first["loc"]))
    field = ".".join(loc) or "spec"
    option, rest = _option_of(loc)
    where = f" {'.'.join(rest)}" if rest else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return SpecError(f"{option}{where} ({field}): {message}{more}", field=field)


def _option_of(loc: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The option that sets the field at ``loc``, and the part of ``loc`` below it."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in _OPTION_NAMES:
            return _OPTION_NAMES[loc[:n]], loc[n:]
    if not loc:
        return "the spec options", ()
    return f"--{loc[0].replace('_', '-')}", loc[1:]


def spec_options(
    fields: Collection[str] | None = None,
    *,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Add the options of BuildSpec ``fields`` (None: every field the command line offers) but
    ``exclude`` to a command, which receives ``spec: BuildSpec`` in their place
    (:func:`spec_from_options`, over ``defaults``). A spec the model refuses ends the command
    with one line naming the option and the field (exit 2)."""
    wanted = set(SPEC_FIELD_OPTIONS if fields is None else fields) - set(exclude)
    unknown = wanted - set(SPEC_FIELD_OPTIONS)
    if unknown:
        raise ValueError(f"not BuildSpec fields the command line offers: {sorted(unknown)}")
    ordered = [field for field in SPEC_FIELD_OPTIONS if field in wanted]
    names = [name for field in ordered for name in _SPEC_PARAMETERS[field]]

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        @wraps(func)
        def command(*args: Any, **kwargs: Any) -> R:
            values = {name: kwargs.pop(name) for name in names}
            try:
                spec = spec_from_options(values, defaults)
            except TrtforgeError as exc:
                path = click.get_current_context().command_path
                fail(exc.message, exc.hint or f"See {path} --help.")
            return func(*args, spec=spec, **kwargs)

        decorated: Callable[..., R] = command
        for field in reversed(ordered):  # click lists the last decorator applied first
            for option in reversed(SPEC_FIELD_OPTIONS[field]):
                decorated = option(decorated)
        return decorated

    return decorate


# -- dataset and calibration options -------------------------------------------------------------

calibration_batch_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Calibration batch (default: what fits --memory-limit).",
)
max_samples_option = click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Calibrate on the first N samples only.",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for ONNX Runtime and for binning activations (default: all available).",
)
"""The dataset options every command that calibrates shares (with --memory-limit, --preprocess)."""

preprocess_option = click.option(
    "--preprocess",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="JSON preprocessing spec for image zips.",
)
"""``--preprocess``: shared by every command that reads a dataset."""


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from calibrators.memory import parse_byte_size

    try:
        return None if value is None else parse_byte_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


memory_limit_option = click.option(
    "--memory-limit",
    "memory_limit_bytes",
    default="1GiB",
    show_default=True,
    callback=_byte_size,
    help="Memory for calibration activations (1GiB, 512MiB, 2GB or bytes): ONNX Runtime runs "
    "micro-batches, and groups of tensors, that fit it whatever --batch-size is.",
)
"""``--memory-limit``: shared by every command that collects calibration statistics."""


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn trtforge errors (and the usual OS errors) into one line on stderr, no traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except TrtforgeError as exc:
            fail(exc.message, exc.hint)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            fail(f"{exc.strerror}: {exc.filename}")
        except KeyboardInterrupt:
            fail("interrupted")

    return wrapper
