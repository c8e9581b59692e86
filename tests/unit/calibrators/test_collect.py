from __future__ import annotations

import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.collect import _with_outputs, auto_batch_size, collect, observable_tensors
from calibrators.data import CalibrationDataset
from core.errors import ModelError
from tests import zoo

TINY_ACTIVATIONS = [
    "image",
    "c1",
    "r1",
    "c2",
    "res",
    "r2",
    "ap",
    "mp",
    "cat",
    "c3",
    "gap",
    "flat",
    "logits",
]


class Recorder:
    def __init__(self) -> None:
        self.seen: dict[str, list[np.ndarray]] = {}
        self.tensors: tuple[str, ...] = ()
        self.aliases: dict[str, str] = {}

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        self.tensors, self.aliases = tuple(tensors), dict(aliases)

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        for name, values in tensors:
            self.seen.setdefault(name, []).append(values.copy())


def _reference(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    for n in names:
        if n not in {o.name for o in augmented.graph.output} and n not in {
            i.name for i in augmented.graph.input
        }:
            augmented.graph.output.append(onnx.ValueInfoProto(name=n))
    session = ort.InferenceSession(
        augmented.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    wanted = [n for n in names if n not in feeds]
    out = dict(zip(wanted, session.run(wanted, feeds), strict=True))
    out.update(feeds)
    return out


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def test_observable_tensors_are_float_activations_in_graph_order() -> None:
    plan = observable_tensors(zoo.tiny_cnn())
    assert list(plan.tensors) == TINY_ACTIVATIONS
    # flat = Flatten(gap) holds gap's values: an alias, not observed
    assert plan.aliases == {"flat": "gap"}
    assert plan.observed == tuple(n for n in TINY_ACTIVATIONS if n != "flat")
    # the batch axis is symbolic, the rest static: the per-sample size (observed tensors) is known
    assert plan.bytes_per_sample == 4 * (
        3 * 256 + 5 * 8 * 256 + 2 * 8 * 64 + 16 * 64 + 8 * 64 + 8 + 10
    )
    fixed = observable_tensors(zoo.tiny_cnn(batch=1))
    assert fixed.bytes_per_sample == plan.bytes_per_sample
    assert auto_batch_size(fixed, budget_bytes=fixed.bytes_per_sample * 5) == 5


def test_constant_subgraphs_and_integer_tensors_are_not_observed() -> None:
    plan = observable_tensors(zoo.tiny_cnn(constants_as_nodes=True))
    assert list(plan.tensors) == TINY_ACTIVATIONS
    two = observable_tensors(zoo.tiny_two_input())
    assert "ids" not in two.tensors  # int64 input
    assert "emb" in two.tensors and "x" in two.tensors and "y" in two.tensors


def test_collect_streams_exact_activations_batch_by_batch(tiny_cnn_path: Path) -> None:
    images = _images(10)
    recorder = Recorder()
    seen = collect(
        tiny_cnn_path, CalibrationDataset.from_arrays({"image": images}), recorder, batch_size=4
    )
    assert seen == 10
    assert recorder.tensors == tuple(TINY_ACTIVATIONS) and recorder.aliases == {"flat": "gap"}
    assert set(recorder.seen) == set(TINY_ACTIVATIONS) - {"flat"}  # aliases are not observed
    assert [a.shape[0] for a in recorder.seen["c1"]] == [4, 4, 2]
    reference = _reference(zoo.tiny_cnn(), {"image": images}, TINY_ACTIVATIONS)
    for name in recorder.seen:
        np.testing.assert_allclose(
            np.concatenate(recorder.seen[name]), reference[name], rtol=1e-5, atol=1e-5
        )
    # what makes it an alias: the same values, rearranged
    np.testing.assert_array_equal(np.sort(reference["flat"], None), np.sort(reference["gap"], None))


def test_collect_honours_max_samples_and_reports_progress(tiny_cnn_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    recorder = Recorder()
    seen = collect(
        tiny_cnn_path,
        CalibrationDataset.from_arrays({"image": _images(9)}),
        recorder,
        batch_size=2,
        max_samples=5,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert seen == 5
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert sum(a.shape[0] for a in recorder.seen["image"]) == 5


def test_collect_works_with_constant_nodes_and_external_data(tmp_path: Path) -> None:
    images = _images(6)
    model = zoo.tiny_cnn(constants_as_nodes=True)
    path = tmp_path / "const.onnx"
    onnx.save(model, path)
    a, b = Recorder(), Recorder()
    collect(path, CalibrationDataset.from_arrays({"image": images}), a, batch_size=3)
    external = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "ext")
    assert (tmp_path / "ext" / "weights.bin").stat().st_size > 0
    collect(external, CalibrationDataset.from_arrays({"image": images}), b, batch_size=3)
    np.testing.assert_allclose(
        np.concatenate(a.seen["logits"]), np.concatenate(b.seen["logits"]), rtol=1e-5
    )


def test_external_data_escaping_the_model_folder_is_refused(tmp_path: Path) -> None:
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    onnx.save(model, path)
    with pytest.raises(ModelError, match="outside the model's folder"):
        collect(path, CalibrationDataset.from_arrays({"image": _images(2)}), Recorder())


def test_not_an_onnx_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf at all \xff\xfe")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        collect(bad, CalibrationDataset.from_arrays({"image": _images(2)}), Recorder())


def test_memory_does_not_grow_with_sample_count(
    tiny_cnn_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # validation streams in batches of at most _HASH_BATCH_BYTES; make that small so both runs stream
    monkeypatch.setattr("calibrators.data._HASH_BATCH_BYTES", 64 * 1024)

    class Peak:
        def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
            pass

        def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
            pass

    def traced_peak(n: int) -> int:
        dataset = CalibrationDataset.from_arrays({"image": _images(n)})
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        collect(tiny_cnn_path, dataset, Peak(), batch_size=8)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return peak

    small, large = traced_peak(32), traced_peak(512)
    assert large < small * 1.5 + 256 * 1024, (small, large)


# --------------------------------------------------------------------------------------------
# passes, micro-batches and groups within a memory limit


class Passes(Recorder):
    """A multi-pass observer: records every call, and the values of each pass separately."""

    def __init__(self, passes: int = 2) -> None:
        super().__init__()
        self.count = passes
        self.calls: list[tuple[object, ...]] = []
        self.by_pass: dict[int, dict[str, list[np.ndarray]]] = {}
        self.index = -1

    def passes(self, split_batches: bool) -> int:
        self.calls.append(("passes", split_batches))
        return self.count

    def begin_pass(self, index: int, tensors: Sequence[str]) -> None:
        self.calls.append(("begin_pass", index, tuple(tensors)))
        self.index = index

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        self.calls.append(("observe", tuple(n for n, _ in tensors), len(tensors[0][1])))
        for name, values in tensors:
            self.by_pass.setdefault(self.index, {}).setdefault(name, []).append(values.copy())

    def end_batch(self) -> None:
        self.calls.append(("end_batch",))


def test_plain_observers_get_micro_batches_that_fit_the_memory_limit(tiny_cnn_path: Path) -> None:
    plan = observable_tensors(zoo.tiny_cnn())
    assert plan.bytes_per_sample is not None
    largest = max(size or 0 for size in plan.tensor_bytes.values())
    # observed activations + the input + ONNX Runtime's working tensors (twice the largest)
    one_sample = plan.bytes_per_sample + 3 * 16 * 16 * 4 + 2 * largest
    recorder = Recorder()
    images = _images(10)
    seen = collect(
        tiny_cnn_path,
        CalibrationDataset.from_arrays({"image": images}),
        recorder,
        batch_size=8,
        memory_limit_bytes=3 * one_sample,
    )
    assert seen == 10
    assert [a.shape[0] for a in recorder.seen["c1"]] == [3, 3, 3, 1]  # not the batch of 8
    reference = _reference(zoo.tiny_cnn(), {"image": images}, TINY_ACTIVATIONS)
    for name in recorder.seen:
        np.testing.assert_allclose(
            np.concatenate(recorder.seen[name]), reference[name], rtol=1e-5, atol=1e-5
        )


def test_tensors_are_observed_in_groups_when_one_sample_exceeds_the_limit(
    tiny_cnn_path: Path,
) -> None:
    observer = Passes()
    images = _images(5)
    progress: list[tuple[int, int]] = []
    collect(
        tiny_cnn_path,
        CalibrationDataset.from_arrays({"image": images}),
        observer,
        batch_size=4,
        memory_limit_bytes=48 * 1024,  # below one sample's ~60 KB of activations and overhead
        progress=lambda d, t: progress.append((d, t)),
    )
    starts = [c for c in observer.calls if c[0] == "begin_pass"]
    groups = [c[2] for c in starts if c[1] == 0]
    assert len(groups) > 1
    # every observed tensor in exactly one group, the groups in graph order
    observed = [n for n in TINY_ACTIVATIONS if n != "flat"]
    assert [n for g in groups for n in g] == observed
    # each group: pass 0 then pass 1, each over every sample, in micro-batches within batches
    assert [c[1] for c in starts] == [0, 1] * len(groups)
    assert observer.calls[0] == ("passes", True)
    per_pass = observer.calls[1 : 1 + len(observer.calls) // (2 * len(groups))]
    sizes = [c[2] for c in per_pass if c[0] == "observe"]
    assert sum(sizes) == 5 and max(sizes) < 4
    ends = [i for i, c in enumerate(per_pass) if c[0] == "end_batch"]
    seen_at_ends = [sum(c[2] for c in per_pass[:i] if c[0] == "observe") for i in ends]
    assert seen_at_ends == [4, 5]  # batch boundaries, not micro-batch ones
    reference = _reference(zoo.tiny_cnn(), {"image": images}, TINY_ACTIVATIONS)
    for index in (0, 1):
        assert set(observer.by_pass[index]) == set(observed)
        for name, values in observer.by_pass[index].items():
            np.testing.assert_allclose(
                np.concatenate(values), reference[name], rtol=1e-5, atol=1e-5
            )
    assert progress[-1] == (5 * 2 * len(groups), 5 * 2 * len(groups))


def test_a_model_with_a_fixed_batch_of_one_runs_one_sample_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    onnx.save(zoo.tiny_cnn(batch=1), path)
    recorder = Recorder()
    collect(path, CalibrationDataset.from_arrays({"image": _images(3)}), recorder, batch_size=8)
    assert [a.shape[0] for a in recorder.seen["logits"]] == [1, 1, 1]


def test_sample_shapes_make_dynamic_spatial_axes_concrete() -> None:
    model = zoo.tiny_cnn()
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "hw", strict=True):
        dim.dim_param = name
    assert observable_tensors(model).bytes_per_sample is None
    concrete = observable_tensors(model, {"image": (3, 16, 16)})
    assert concrete.bytes_per_sample == observable_tensors(zoo.tiny_cnn()).bytes_per_sample
    assert concrete.tensor_bytes["c1"] == 4 * 8 * 16 * 16
    larger = observable_tensors(model, {"image": (3, 32, 64)})
    assert larger.tensor_bytes["c1"] == 4 * 8 * 32 * 64


def test_a_group_session_computes_only_what_its_tensors_need() -> None:
    pruned = _with_outputs(zoo.tiny_cnn(), ["c2"])
    assert [n.name for n in pruned.graph.node] == ["conv1", "relu1", "conv2"]
    assert {t.name for t in pruned.graph.initializer} == {
        "conv1.w",
        "conv1.b",
        "conv2.w",
        "conv2.b",
    }
    assert [o.name for o in pruned.graph.output] == ["c2"]
    # a model that lists its initializers as inputs (IR < 4) keeps only those still used
    legacy = zoo.tiny_cnn()
    legacy.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        for t in legacy.graph.initializer
    )
    inputs = [i.name for i in _with_outputs(legacy, ["c2"]).graph.input]
    assert inputs == ["image", "conv1.w", "conv1.b", "conv2.w", "conv2.b"]
