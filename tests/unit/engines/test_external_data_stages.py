"""Every INT8 stage (layer statistics, smoothing, calibration, bias correction, build, evaluation)
reads a model's external data from the model's folder, never from the working directory."""

from __future__ import annotations

import os
from pathlib import Path

from engines.spec import BackendName, BuildSpec, Precision, TechniqueMode
from engines.workflow import Workflow
from tests.unit.calibrators.test_external_data import _dataset, _relu6_with_external_data


def _int8_build(model: Path, out: Path, cwd: Path) -> tuple[dict[str, float], float]:
    spec = BuildSpec(
        precision=Precision.INT8,
        backend=BackendName.ONNXRUNTIME,
        smoothing=TechniqueMode.ON,
        bias_correction=TechniqueMode.ON,
    )
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with Workflow(model, spec) as flow:
            split = flow.split(_dataset())
            calibration = flow.calibrate(split.calibration)
            assert calibration is not None
            artifact = flow.build(out, calibration.table)
            sqnr = flow.evaluate(artifact, split.evaluation).outputs[0].sqnr_db
    finally:
        os.chdir(before)
    assert sqnr is not None
    return dict(calibration.table.amax), sqnr


def test_an_int8_build_from_another_working_directory_reads_the_models_own_weights(
    tmp_path: Path,
) -> None:
    model = _relu6_with_external_data(tmp_path / "model")
    expected = _int8_build(model, tmp_path / "a.onnx", model.parent)
    planted = tmp_path / "planted"  # a w.bin of other weights where the build runs
    _relu6_with_external_data(planted, hi=2.0)
    (planted / "model.onnx").unlink()
    assert _int8_build(model, tmp_path / "b.onnx", planted) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _int8_build(model, tmp_path / "c.onnx", empty) == expected
