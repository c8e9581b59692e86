"""BaseRunner: every runner checks its feeds once (names, dtypes, rank and static dims), times
queries, and closes once; through ONNX Runtime and through a minimal subclass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from core.tensors import TensorSpec
from engines.backends.base import QueryTiming, Runner
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.backends.runner import BaseRunner
from engines.errors import RunError
from engines.variants import InMemoryRunner, MemoizedRunner

Feeds = dict[str, np.ndarray]


def _add_model() -> onnx.ModelProto:
    """y = x + bias, x: float32 [batch, 4], bias: float32 [4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reshape_model() -> onnx.ModelProto:
    """v: float32 [n] reshaped to [2, 2]: only n = 4 runs, which no input spec can say."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["v", "shape"], ["w"])],
        "reshape",
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])],
        initializer=[shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def add_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runner") / "add.onnx"
    onnx.save(_add_model(), path)
    return path


def _feeds(batch: int = 2) -> Feeds:
    x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
    return {"x": x, "bias": np.ones(4, dtype=np.float32)}


class Doubler(BaseRunner):
    """The smallest runner: y = 2 x; records what reached ``_run`` and how often it closed."""

    def __init__(self, specs: Sequence[TensorSpec], *, sleep_s: float = 0.0) -> None:
        self._specs = tuple(specs)
        self.sleep_s = sleep_s
        self.received: list[Feeds] = []
        self.closes = 0

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._specs

    @property
    def output_names(self) -> Sequence[str]:
        return ("y",)

    def _run(self, feeds: Feeds) -> Feeds:
        self.received.append(feeds)
        time.sleep(self.sleep_s)
        return {"y": 2 * feeds[self._specs[0].name]}

    def _describe(self) -> dict[str, str]:
        return {"backend": "doubler", "python": "overridden"}

    def _close(self) -> None:
        self.closes += 1


class Casting(Doubler):
    input_casting = "same_kind"


X = TensorSpec("x", "float32", ("batch", 4))


def test_an_onnxruntime_runner_checks_names_before_running(add_path: Path) -> None:
    with OnnxRuntimeRunner(add_path, intra_op_threads=1) as runner:
        np.testing.assert_array_equal(runner.run(_feeds())["y"], _feeds()["x"] + 1)
        with pytest.raises(RunError, match=r"^Missing input\(s\) bias for add\.onnx\.") as missing:
            runner.run({"x": _feeds()["x"]})
        assert missing.value.field == "inputs"
        assert missing.value.hint == "Feed every model input, and only those: x, bias."
        with pytest.raises(RunError, match=r"^Unexpected input\(s\) label for add\.onnx\."):
            runner.run({**_feeds(), "label": np.zeros(2)})
        with pytest.raises(RunError, match=r"Missing input\(s\) x; unexpected input\(s\) z"):
            runner.timed_run({"bias": _feeds()["bias"], "z": np.zeros(2)})


def test_an_onnxruntime_runner_takes_only_its_dtypes(add_path: Path) -> None:
    with OnnxRuntimeRunner(add_path, intra_op_threads=1) as runner:
        feeds = {**_feeds(), "x": _feeds()["x"].astype(np.float64)}
        with pytest.raises(RunError) as info:
            runner.run(feeds)
        assert info.value.message == "Input 'x' is float64; add.onnx takes float32."
        assert info.value.field == "inputs"
        assert "astype(np.float32)" in info.value.hint


def test_static_dims_and_rank_are_checked_symbolic_dims_are_free(add_path: Path) -> None:
    with OnnxRuntimeRunner(add_path, intra_op_threads=1) as runner:
        for batch in (1, 5):  # "batch" takes any size
            assert runner.run(_feeds(batch))["y"].shape == (batch, 4)
        with pytest.raises(RunError, match=r"'x' has shape \[2, 3\]; add.onnx takes \[batch, 4\]"):
            runner.run({**_feeds(), "x": np.zeros((2, 3), np.float32)})
        with pytest.raises(RunError, match=r"'bias' has shape \[1, 4\]; add.onnx takes \[4\]"):
            runner.run({**_feeds(), "bias": np.zeros((1, 4), np.float32)})
        with pytest.raises(RunError, match=r"'x' has shape \[8\]") as info:
            runner.timed_run({**_feeds(), "x": np.zeros(8, np.float32)})
        assert info.value.field == "inputs" and "named dims" in info.value.hint


def test_what_the_checks_cannot_see_is_still_a_run_error(tmp_path: Path) -> None:
    path = tmp_path / "reshape.onnx"
    onnx.save(_reshape_model(), path)
    with OnnxRuntimeRunner(path, intra_op_threads=1) as runner:
        assert runner.run({"v": np.arange(4, dtype=np.float32)})["w"].shape == (2, 2)
        with pytest.raises(RunError, match=r"ONNX Runtime failed running reshape\.onnx") as info:
            runner.run({"v": np.arange(3, dtype=np.float32)})
        assert info.value.field == "inputs"


def test_in_memory_runners_share_the_checks() -> None:
    with InMemoryRunner(_add_model(), "the add model", 1) as runner:
        assert runner.run(_feeds())["y"].shape == (2, 4)
        with pytest.raises(RunError, match=r"Missing input.* for the add model"):
            runner.run({"x": _feeds()["x"]})
    with pytest.raises(RunError, match="the add model is closed"):
        runner.run(_feeds())


def test_run_hands_validated_feeds_in_input_order() -> None:
    bias = TensorSpec("bias", "float32", (4,))
    runner = Casting([X, bias])
    assert isinstance(runner, Runner)
    feeds = {"bias": [0.5] * 4, "x": np.ones((3, 4), np.float32)}  # a list converts too
    out = runner.run(feeds)  # type: ignore[arg-type]
    (received,) = runner.received
    assert list(received) == ["x", "bias"]
    assert isinstance(received["bias"], np.ndarray) and received["bias"].dtype == np.float32
    np.testing.assert_array_equal(out["y"], np.full((3, 4), 2, np.float32))


def test_bad_feeds_never_reach_the_backend() -> None:
    runner = Doubler([X])
    cases: list[Feeds] = [
        {},
        {"x": np.ones((2, 4), np.float32), "y": np.ones(1)},
        {"x": np.ones((2, 4), np.int32)},
        {"x": np.ones((2, 5), np.float32)},
        {"x": np.ones((2, 4, 1), np.float32)},
    ]
    for feeds in cases:
        with pytest.raises(RunError):
            runner.run(feeds)
        with pytest.raises(RunError):
            runner.timed_run(feeds)
    assert runner.received == []


def test_same_kind_casting_converts_what_numpy_calls_the_same_kind() -> None:
    runner = Casting([X])
    runner.run({"x": np.ones((1, 4), np.float64)})
    runner.run({"x": np.ones((1, 4), np.int64)})
    assert [f["x"].dtype for f in runner.received] == [np.float32, np.float32]
    with pytest.raises(RunError, match=r"'x' is complex128; Casting takes float32 \(or a dtype of the same kind"):
        runner.run({"x": np.ones((1, 4), np.complex128)})
    exact = Doubler([X])
    with pytest.raises(RunError) as info:
        exact.run({"x": np.ones((1, 4), np.float64)})
    assert info.value.message == "Input 'x' is float64; Doubler takes float32."


def test_unknown_ranks_and_dtypes_numpy_cannot_hold_are_left_to_the_backend() -> None:
    runner = Doubler([TensorSpec("x", "float32", ()), TensorSpec("s", "bfloat16", (None,))])
    runner.run({"x": np.ones((2, 3, 4), np.float32), "s": np.ones(7, np.float32)})
    runner.run({"x": np.ones(5, np.float32), "s": np.ones(1, np.float16)})
    with pytest.raises(RunError, match=r"'s' has shape \[2, 2\]; Doubler takes \[\?\]"):
        runner.run({"x": np.ones(5, np.float32), "s": np.ones((2, 2), np.float16)})
    assert len(runner.received) == 2


def test_timed_run_times_the_backend_on_the_host() -> None:
    runner = Doubler([X], sleep_s=0.02)
    timing = runner.timed_run({"x": np.ones((1, 4), np.float32)})
    assert isinstance(timing, QueryTiming)
    assert 20.0 <= timing.latency_ms < 1000.0
    assert timing.latency_ms == timing.enqueue_ms == timing.gpu_compute_ms
    assert timing.h2d_ms == timing.d2h_ms == 0.0
    assert len(runner.received) == 1


def test_a_runner_with_its_own_clock_gets_validated_feeds() -> None:
    class DeviceTimed(Doubler):
        def _timed_run(self, feeds: Feeds) -> QueryTiming:
            self.received.append(feeds)
            return QueryTiming(3.0, 1.0, 0.5, 2.0, 0.5)

    runner = DeviceTimed([X])
    assert runner.timed_run({"x": np.ones((1, 4), np.float32)}).gpu_compute_ms == 2.0
    with pytest.raises(RunError, match="Missing input"):
        runner.timed_run({})
    assert len(runner.received) == 1


def test_close_runs_once_and_later_queries_fail() -> None:
    with Doubler([X]) as runner:
        assert not runner.closed
        runner.close()
        runner.close()
    assert runner.closed and runner.closes == 1
    with pytest.raises(RunError) as info:
        runner.run({"x": np.ones((1, 4), np.float32)})
    assert info.value.message == "The runner of Doubler is closed."
    assert "with" in info.value.hint
    with pytest.raises(RunError, match="closed"):
        runner.timed_run({"x": np.ones((1, 4), np.float32)})


def test_describe_adds_the_platform_under_the_backends_keys() -> None:
    info = Doubler([X]).describe()
    assert info["backend"] == "doubler" and info["python"] == "overridden"
    assert info["platform"]


def test_a_memoized_runner_checks_as_the_wrapped_runner_does(add_path: Path) -> None:
    inner = Casting([X])
    with MemoizedRunner(inner) as memo:
        assert memo.label == "Casting" and memo.input_casting == "same_kind"
        first = memo.run({"x": np.ones((2, 4), np.float64)})
        again = memo.run({"x": np.ones((2, 4), np.float32)})  # the same batch once cast
        np.testing.assert_array_equal(first["y"], again["y"])
        assert len(inner.received) == 1
        with pytest.raises(RunError, match="Unexpected input"):
            memo.run({"x": np.ones((2, 4), np.float32), "z": np.ones(1)})
        assert memo.timed_run({"x": np.ones((2, 4), np.float32)}).latency_ms >= 0
        assert len(inner.received) == 2  # timed queries always run
    assert inner.closes == 1
    memo.close()
    assert inner.closes == 1
    with (
        MemoizedRunner(OnnxRuntimeRunner(add_path, intra_op_threads=1)) as memo,
        pytest.raises(RunError, match=r"'x' is float64; add\.onnx takes float32\."),
    ):
        memo.run({**_feeds(), "x": _feeds()["x"].astype(np.float64)})
