"""Keep patterns: ``re:`` regexes are RE2 (linear time), refused when RE2 cannot compile them."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from engines.errors import SpecError
from engines.spec import (
    MAX_KEEP_PATTERN_CHARS,
    MAX_KEEP_PATTERNS,
    BuildSpec,
    KeepRules,
    node_matches,
)
from service.cli.options import spec_from_options


def test_a_catastrophic_regex_matches_in_milliseconds() -> None:
    rules = KeepRules(int8=("re:(a+)+",))
    name = "a" * 27 + "!"
    started = time.perf_counter()
    for _ in range(100):
        assert not node_matches(rules.int8, name, "Conv")
    # Python's backtracking engine takes seconds for one match (doubling per character)
    assert time.perf_counter() - started < 0.5
    assert node_matches(rules.int8, "a" * 27, "Conv")


def test_longer_names_stay_linear() -> None:
    started = time.perf_counter()
    assert not node_matches(("re:(a|aa)*(b|a+)+c",), "a" * 100_000, "Relu")
    assert time.perf_counter() - started < 0.5


def test_regexes_match_the_whole_name_and_plain_patterns_name_or_op() -> None:
    patterns = ("re:conv[0-9]+", "Softmax", "head.fc")
    assert node_matches(patterns, "conv12", "Conv")
    assert not node_matches(patterns, "xconv12", "Conv")
    assert not node_matches(patterns, "conv12_relu", "Relu")
    assert node_matches(patterns, "anything", "Softmax")
    assert node_matches(patterns, "head.fc", "Gemm")
    assert not node_matches(patterns, "headxfc", "Gemm")  # plain patterns are not regexes


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"re:(a)\1", "invalid escape sequence"),
        ("re:(?=a)b", "invalid perl operator"),
        ("re:(unclosed", "missing )"),
        ("re:a{2000}", "invalid repetition size"),
        ("re:(a{500}){500}", "invalid repetition size"),
    ],
)
def test_patterns_re2_cannot_compile_are_refused_with_the_reason(pattern: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        BuildSpec.model_validate({"keep": {"fp16": [pattern]}})
    error = info.value.errors()[0]
    assert error["loc"] == ("keep", "fp16")
    assert reason in error["msg"]
    assert "RE2 syntax" in error["msg"]


def test_the_cli_names_the_option_of_a_bad_pattern() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_options({"keep": ("re:(?<=x)y",)})
    assert "--keep" in f"{info.value.message} {info.value.hint}"
    assert info.value.field == "keep.int8"


def test_pattern_count_and_length_are_bounded() -> None:
    with pytest.raises(ValidationError, match="more than the limit"):
        KeepRules(int8=tuple(f"n{i}" for i in range(MAX_KEEP_PATTERNS + 1)))
    with pytest.raises(ValidationError, match="characters"):
        KeepRules(int8=("x" * (MAX_KEEP_PATTERN_CHARS + 1),))
