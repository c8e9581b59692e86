"""The command line's options agree with the types that define them: every choice is an enum's
values, and the build spec options are BuildSpec's fields, validated as POST /v1/builds
validates them."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from calibrators.spec import CalibrationMethod, HistogramMode
from engines.accuracy_report import AccuracyMetric
from engines.names import BackendName
from engines.spec import BuildSpec, Precision, TechniqueMode, TensorRTMode
from engines.variants import QdqExecution
from service.cli.main import cli
from service.cli.options import (
    SPEC_FIELD_OPTIONS,
    SPEC_FIELDS_NOT_OFFERED,
    spec_from_options,
    spec_request,
)
from service.schemas import BuildCreate, BuildStatus, Scope, SweepPreset

ENUM_OPTIONS: dict[str, type[StrEnum]] = {
    "--precision": Precision,
    "--method": CalibrationMethod,
    "--histogram": HistogramMode,
    "--backend": BackendName,
    "--mode": TensorRTMode,
    "--smoothing": TechniqueMode,
    "--bias-correction": TechniqueMode,
    "--scope": Scope,
    "--execution": QdqExecution,
    "--metric": AccuracyMetric,
    "--preset": SweepPreset,
    "--status": BuildStatus,
}
"""Each option that offers a fixed set of values, and the enum that defines them."""


def _commands(group: click.Group, path: str = "trtforge") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def _choice_options() -> Iterator[tuple[str, str, click.Choice[Any]]]:
    for path, command in _commands(cli):
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
                yield path, param.opts[0], param.type


def test_every_choice_is_an_enums_values() -> None:
    seen: set[str] = set()
    for path, option, choice in _choice_options():
        assert option in ENUM_OPTIONS, f"{path} {option}: a choice no enum defines"
        assert list(choice.choices) == [m.value for m in ENUM_OPTIONS[option]], (path, option)
        seen.add(option)
    assert seen == set(ENUM_OPTIONS)  # the walk found them all: the table is not stale


def _option_names(command: str) -> set[str]:
    return {p.opts[0] for p in cli.commands[command].params if isinstance(p, click.Option)}


def test_spec_options_are_buildspec_fields_and_build_and_submit_share_them() -> None:
    assert set(SPEC_FIELD_OPTIONS) | set(SPEC_FIELDS_NOT_OFFERED) == set(BuildSpec.model_fields)
    spec = {
        opt
        for options in SPEC_FIELD_OPTIONS.values()
        for add_option in options
        for opt in click.command()(add_option(lambda **_: None)).params[0].opts
    }
    assert {"--shapes", "--keep-fp16", "--gate", "--num-quant-bins"} <= spec
    assert spec <= _option_names("build") and spec <= _option_names("submit")
    assert spec - {"--precision"} <= _option_names("sweep")  # its variants are precisions
    sweeps = cli.commands["sweeps"]
    assert isinstance(sweeps, click.Group)
    remote = {p.opts[0] for p in sweeps.commands["submit"].params if isinstance(p, click.Option)}
    assert spec - {"--precision"} <= remote  # trtforge sweeps submit: the same spec options
    measured = {"--eval-data", "--labels", "--accuracy-budget"}  # as trtforge build measures
    assert measured <= _option_names("submit") and {"--labels", "--accuracy-budget"} <= (
        _option_names("build")
    )


VALUES: list[dict[str, Any]] = [
    {},
    {"precision": "int8", "method": "percentile", "percentile": 99.9, "backend": "onnxruntime"},
    {"method": "auto", "auto_samples": 8, "num_quant_bins": 256, "histogram": "tensorrt"},
    {"shapes": ("x:1x3x8x8/2x3x8x8/4x3x8x8",), "keep": ("Conv",), "keep_fp16": ("re:.*norm",)},
    {"gate": ("sqnr_db:20", "cosine:0.99"), "smoothing": "off", "bias_correction": "on"},
    {"gate": ("none",), "mode": "implicit", "quantize_attention": True},
]


@pytest.mark.parametrize("values", VALUES)
def test_the_cli_spec_is_the_api_spec(values: dict[str, Any]) -> None:
    """The spec a command builds is the one POST /v1/builds makes of the same request."""
    spec = spec_from_options(values)
    request = {"model_id": "m", "dataset_id": "d", "spec": spec_request(values)}
    assert BuildCreate.model_validate(request).spec == spec
    assert BuildSpec.model_validate_json(spec.model_dump_json()) == spec


def test_spec_option_values_land_in_their_fields() -> None:
    spec = spec_from_options(VALUES[1] | VALUES[3] | VALUES[4])
    assert spec.precision is Precision.INT8 and spec.backend is BackendName.ONNXRUNTIME
    assert spec.calibration.method is CalibrationMethod.PERCENTILE
    assert spec.calibration.percentile == 99.9
    assert spec.profiles["x"].max == (4, 3, 8, 8)
    assert spec.keep.int8 == ("Conv",) and spec.keep.fp16 == ("re:.*norm",)
    assert spec.gate is not None and str(spec.gate) == "sqnr_db >= 20, cosine >= 0.99"
    assert spec.smoothing is TechniqueMode.OFF and spec.bias_correction is TechniqueMode.ON
    assert spec_from_options({}) == BuildSpec()  # no option given: the API's defaults


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read: the spec is checked first")
    return path


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--method", "percentile", "--percentile", "200"],
            "error: --percentile (calibration.percentile): percentile must be in (0, 100], "
            "got 200.0",
        ),
        (
            ["--percentile", "99"],
            "error: --method (calibration): percentile applies only to method 'percentile', "
            "not 'auto'",
        ),
        (
            ["--auto-samples", "0"],
            "error: --auto-samples (calibration.samples): samples must be between 1 and 4096, "
            "got 0",
        ),
        (
            ["--keep-fp16", "re:("],
            "error: --keep-fp16 (keep.fp16): keep pattern 're:(' is not a valid regex: missing ): "
            "( (RE2 syntax: Python's without backreferences or lookaround)",
        ),
        (
            ["--shapes", "x:4x3/2x3/1x3"],
            "error: --shapes x (profiles.x): need 1 <= min <= opt <= max in every dim, got "
            "(4, 3)/(2, 3)/(1, 3)",
        ),
        (["--shapes", "1x3"], "error: --shapes '1x3' needs NAME:MIN/OPT/MAX."),
        (
            ["--gate", "none", "--gate", "sqnr_db:3"],
            "error: --gate (gate): The gate none, sqnr_db:3 mixes 'none' with budgets. Give "
            "either 'none' (no gate) or METRIC:VALUE budgets.",
        ),
    ],
)
@pytest.mark.parametrize("command", ["build", "submit"])
def test_a_refused_spec_is_one_line_naming_option_and_field(
    command: str, args: list[str], line: str, model: Path, tmp_path: Path
) -> None:
    around = {
        "build": ["--out", str(tmp_path / "x.onnx")],
        "submit": ["--data", str(model), "--server", "http://127.0.0.1:9"],  # never reached
    }[command]
    result = CliRunner().invoke(cli, [command, str(model), *args, *around])
    assert result.exit_code == 2, result.output
    first, *rest = result.stderr.splitlines()
    assert first == line
    assert rest == [] or rest[0].startswith("hint: ")
    assert not (tmp_path / "x.onnx").exists()
