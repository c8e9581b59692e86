from __future__ import annotations

import pytest

from calibrators.spec import PreprocessSpec
from service.store.ingest import dataset_id, safe_filename


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("calib.npz", "calib.npz"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\data set.npz", "data_set.npz"),
        ("ünïcode.onnx", "_n_code.onnx"),
        ("..", "fallback.npz"),
        ("", "fallback.npz"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, "fallback.npz") == expected


def test_dataset_id_covers_how_the_bytes_are_read() -> None:
    sha = "a" * 64
    assert dataset_id(sha, None, None) == sha
    crop = dataset_id(sha, PreprocessSpec(center_crop=224), None)
    assert crop != sha
    assert crop == dataset_id(sha, PreprocessSpec(center_crop=224), None)
    assert crop != dataset_id(sha, PreprocessSpec(center_crop=256), None)
    assert dataset_id(sha, None, "x") != dataset_id(sha, None, "y")
