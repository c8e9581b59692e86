from __future__ import annotations

import pytest

from calibrators.memory import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    estimate_unknown,
    parse_byte_size,
    plan_collection,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1GiB", 1 << 30),
        ("512MiB", 512 * MIB),
        ("512 mib", 512 * MIB),
        ("2GB", 2_000_000_000),
        ("1.5G", 3 << 29),
        ("800M", 800 * MIB),
        ("64k", 64 * 1024),
        ("1073741824", 1 << 30),
        (4096, 4096),
    ],
)
def test_sizes_parse_in_binary_and_decimal_units(text: str | int, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1 parsec", "-1GiB", "0", "0.1", "GiB"])
def test_nonsense_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_byte_size(text)


def test_a_sample_that_fits_runs_in_micro_batches_of_one_group() -> None:
    tensors = {"image": 0, "a": 100 * MIB, "b": 200 * MIB, "c": 50 * MIB}
    plan = plan_collection(
        tensors,
        input_bytes=5 * MIB,
        working_bytes=30 * MIB,
        memory_limit_bytes=DEFAULT_MEMORY_LIMIT_BYTES,
        batch_size=8,
    )
    assert plan.groups == (("image", "a", "b", "c"),)
    assert plan.micro_batch == 2  # 1024 // (350 + 35)
    assert plan.split_batches and plan.sample_bytes == 350 * MIB
    assert plan.run_bytes == 2 * 385 * MIB <= DEFAULT_MEMORY_LIMIT_BYTES
    whole = plan_collection(
        tensors,
        input_bytes=5 * MIB,
        working_bytes=30 * MIB,
        memory_limit_bytes=64 << 30,
        batch_size=8,
    )
    assert whole.micro_batch == 8 and not whole.split_batches  # never more than the batch


def test_a_sample_that_does_not_fit_is_observed_in_as_few_groups_as_fit() -> None:
    tensors = {f"t{i}": 300 * MIB for i in range(7)}  # 2.1 GB per sample
    plan = plan_collection(
        tensors,
        input_bytes=10 * MIB,
        working_bytes=14 * MIB,
        memory_limit_bytes=1000 * MIB,
        batch_size=4,
    )
    assert plan.groups == (("t0", "t1", "t2"), ("t3", "t4", "t5"), ("t6",))
    assert plan.micro_batch == 1
    assert plan.run_bytes <= 1000 * MIB
    # graph order kept, every tensor once
    assert [t for g in plan.groups for t in g] == list(tensors)


def test_a_tensor_larger_than_the_limit_is_observed_alone(caplog: pytest.LogCaptureFixture) -> None:
    plan = plan_collection(
        {"small": MIB, "huge": 900 * MIB, "after": MIB},
        input_bytes=0,
        working_bytes=0,
        memory_limit_bytes=100 * MIB,
        batch_size=8,
    )
    assert plan.groups == (("small",), ("huge",), ("after",))
    assert plan.micro_batch == 1
    assert "'huge'" in caplog.text and "observed alone" in caplog.text


def test_a_fixed_batch_axis_caps_the_micro_batch() -> None:
    plan = plan_collection(
        {"a": MIB},
        input_bytes=0,
        working_bytes=0,
        memory_limit_bytes=1 << 30,
        batch_size=16,
        max_micro_batch=1,
    )
    assert plan.micro_batch == 1 and plan.batch_size == 16


def test_unknown_sizes_take_the_largest_input_of_their_node() -> None:
    known = {"x": 40, "a": 400, "b": None, "c": None, "d": 10}
    producers = {"a": ("x",), "b": ("a", "x"), "c": ("b",), "d": ("c",)}
    assert estimate_unknown(known, producers) == {"x": 40, "a": 400, "b": 400, "c": 400, "d": 10}
    assert estimate_unknown({"y": None}, {}) == {"y": 4 * MIB}
