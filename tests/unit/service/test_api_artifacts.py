from __future__ import annotations

import pytest

from service.api.artifacts import content_disposition, parse_range
from service.errors import RangeNotSatisfiableError


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=5-2", None),
        ("items=0-1", None),
        ("bytes=0-1,5-6", None),
        ("bytes=abc", None),
        # malformed: ignored (RFC 9110 14.2), the whole file is sent
        ("bytes=--5", None),
        ("bytes=-", None),
        ("bytes=+1-2", None),
        ("bytes=1-+2", None),
        ("bytes=1_0-20", None),
        ("bytes=-1_0", None),
        ("bytes=\u0663-4", None),
        ("bytes=200-100", None),
        ("bytes=0x1-2", None),
        (" bytes = 3-4 ", (3, 4)),
        ("bytes=0-" + "9" * 5000, None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError) as info:
        parse_range(header, 100)
    assert info.value.size_bytes == 100


def test_content_disposition_quotes_safely() -> None:
    assert content_disposition("m-int8.engine") == (
        "attachment; filename=\"m-int8.engine\"; filename*=UTF-8''m-int8.engine"
    )
    tricky = content_disposition('a"b\\ü.onnx')
    assert 'filename="a_b__.onnx"' in tricky
    assert "filename*=UTF-8''a%22b%5C%C3%BC.onnx" in tricky
