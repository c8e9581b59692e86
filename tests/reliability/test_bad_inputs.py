"""A corpus of bad inputs against a real ``trtforge serve``: malformed models, datasets and archives
(path escapes, zip bombs, symlinks), specs, sizes above the server's bounds, user regexes, opsets
and custom ops. Every refusal answers the error envelope with the right status and code, leaves
no file, row or temporary behind, and the server answers ``/healthz`` after it.

Inputs whose size is allowed but amplifies (a large shard in a tiny zip, a large model) are taken
with the server's memory measured, and a build over its memory limit fails with
``resource_limit`` while the worker goes on building.
"""

from __future__ import annotations

import io
import stat
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests import zoo
from tests.integration.conftest import Server
from tests.reliability.test_http_edges import _PeakRss
from tests.unit.service.support import (
    database_url,
    dataset_bytes,
    model_bytes,
    npz_bytes,
)

pytestmark = pytest.mark.reliability

MiB = 1 << 20
BUILD_MEMORY = 1280 * MiB
ENV = {
    "TRTFORGE_WORKERS": "1",
    "TRTFORGE_MAX_UPLOAD_BYTES": str(80 * MiB),
    "TRTFORGE_MAX_ARCHIVE_BYTES": str(256 * MiB),
    "TRTFORGE_MAX_ARCHIVE_MEMBER_BYTES": str(256 * MiB),
    "TRTFORGE_MAX_BENCHMARK_ITERATIONS": "1000",
    "TRTFORGE_MAX_BENCHMARK_DURATION_S": "60",
    "TRTFORGE_MAX_BENCHMARK_WARMUP_MS": "10000",
    "TRTFORGE_MAX_CALIBRATION_BATCH_SIZE": "64",
    "TRTFORGE_MAX_CALIBRATION_SAMPLES": "1000",
    "TRTFORGE_MAX_ACCURACY_SAMPLES": "1000",
    "TRTFORGE_MAX_PREPROCESSED_PIXELS": str(1024 * 1024),
    "TRTFORGE_BUILD_MEMORY_BYTES": str(BUILD_MEMORY),
}
LONG_NAME = "a" * 27 + "!"


@dataclass
class Live:
    """A server for the corpus: SQLite only (input checks do not depend on the database; the
    PostgreSQL paths of refusals run in test_races, test_http_edges, test_load and test_faults),
    which keeps the tier within CI's time."""

    server: Server
    model_id: str
    dataset_id: str

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.server.url}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["sqlite"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("bad-inputs")
    with database_url(request.param, folder) as url:
        server = Server(folder / "data", url, folder / "server.log", env=dict(ENV))
        server.start()
        try:
            model = _upload(server, "/v1/models", "tiny.onnx", model_bytes())
            dataset = _upload(server, "/v1/datasets", "calib.npz", dataset_bytes(8))
            yield Live(server, model["id"], dataset["id"])
        finally:
            server.stop()


def _upload(server: Server, path: str, name: str, data: bytes, **fields: str) -> dict[str, str]:
    response = httpx.post(
        f"{server.url}{path}", files={"file": (name, data)}, data=fields, timeout=120
    )
    assert response.status_code in (200, 201), response.text
    body: dict[str, str] = response.json()
    return body


# -- inputs ------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_with(info: zipfile.ZipInfo, data: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, data)
        for name, payload in (extra or {}).items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _symlink_zip(name: str) -> bytes:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip_with(info, b"/etc/passwd")


def _encrypted_zip(name: str, data: bytes) -> bytes:
    """A member flagged encrypted (zipfile writes no encrypted members: set the flag bits)."""
    raw = bytearray(_zip({name: data}, zipfile.ZIP_STORED))
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(signature) + flags_at
        raw[at] |= 0x1
    return bytes(raw)


def _duplicate_zip(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(name, data)
            archive.writestr(name, data)
    return buffer.getvalue()


def _bomb(name: str, size: int = 300 * MiB) -> bytes:
    """A deflated member of ``size`` zeros (about 0.3 MB): more than the archive limits."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open(name, "w", force_zip64=True) as member,
    ):
        chunk = bytes(16 * MiB)
        for _ in range(size // len(chunk)):
            member.write(chunk)
    return buffer.getvalue()


def _onnx(
    nodes: list[onnx.NodeProto],
    opsets: dict[str, int] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    width: int = 4,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        initializers or [],
    )
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    return bytes(helper.make_model(graph, opset_imports=imports).SerializeToString())


def _relu(**kwargs: object) -> bytes:
    return _onnx([helper.make_node("Relu", ["x"], ["y"], name=LONG_NAME)], **kwargs)  # type: ignore[arg-type]


def _external_zip(location: str, with_file: bool = True, file_bytes: int = 1 << 20) -> bytes:
    model = zoo.tiny_cnn()
    for tensor in model.graph.initializer:
        data = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    members = {"model.onnx": model.SerializeToString()}
    if with_file:
        members["w.bin"] = bytes(file_bytes)
    return _zip(members)


def _short_weights() -> bytes:
    weight = numpy_helper.from_array(np.ones((4, 4096), np.float32), "w")
    weight.raw_data = weight.raw_data[:-4]
    return _onnx(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        initializers=[weight],
    )


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray, **kwargs: bool) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def _image_zip() -> bytes:
    return _zip({f"{i}.png": _png(64, 48) for i in range(3)})


def _nan_dataset() -> bytes:
    images = np.zeros((4, 3, 16, 16), np.float32)
    images[2, 0, 0, 0] = np.nan
    return npz_bytes(image=images)


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Live], httpx.Response]
    status: int
    code: str
    field: str | None = None
    needle: str = ""


def _model(name: str, data: bytes) -> Callable[[Live], httpx.Response]:
    return lambda live: live.post("/v1/models", files={"file": (name, data)})


def _dataset(name: str, data: bytes, **fields: str) -> Callable[[Live], httpx.Response]:
    def send(live: Live) -> httpx.Response:
        given = {k: (live.model_id if v == "@model" else v) for k, v in fields.items()}
        return live.post("/v1/datasets", files={"file": (name, data)}, data=given)

    return send


def _build(**body: object) -> Callable[[Live], httpx.Response]:
    def send(live: Live) -> httpx.Response:
        payload = {"model_id": live.model_id, "dataset_id": live.dataset_id, **body}
        return live.post("/v1/builds", json=payload)

    return send


def _raw(method: str, path: str, **kwargs: object) -> Callable[[Live], httpx.Response]:
    return lambda live: httpx.request(method, f"{live.server.url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]


TINY = model_bytes()
CUSTOM = {"": 17, "com.example": 1}
SUBGRAPH = helper.make_graph(
    [helper.make_node("Secret", [], ["t"], domain="acme")],
    "branch",
    [],
    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
)

CASES = [
    # -- models ----------------------------------------------------------------------------------
    Case("model-truncated", _model("m.onnx", TINY[:300]), 422, "model_invalid", needle="ONNX"),
    Case("model-not-onnx", _model("m.onnx", b"this is not a model"), 422, "model_invalid"),
    Case("model-empty-file", _model("m.onnx", b""), 422, "model_invalid"),
    Case("model-empty-graph", _model("m.onnx", _onnx([])), 422, "model_invalid", needle="empty"),
    Case(
        "model-opset-9999",
        _model("m.onnx", _relu(opsets={"": 9999})),
        422,
        "model_invalid",
        needle="opset 9999",
    ),
    Case(
        "model-ml-opset-99",
        _model("m.onnx", _relu(opsets={"": 17, "ai.onnx.ml": 99})),
        422,
        "model_invalid",
        needle="ai.onnx.ml",
    ),
    Case(
        "model-custom-domain",
        _model(
            "m.onnx", _onnx([helper.make_node("Op", ["x"], ["y"], domain="com.example")], CUSTOM)
        ),
        422,
        "model_invalid",
        needle="com.example",
    ),
    Case(
        "model-unknown-ort-op",
        _model(
            "m.onnx",
            _onnx(
                [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.microsoft")],
                {"": 17, "com.microsoft": 1},
            ),
        ),
        422,
        "model_invalid",
        needle="ONNX Runtime has no op",
    ),
    Case(
        "model-custom-op-in-subgraph",
        _model(
            "m.onnx",
            _onnx(
                [helper.make_node("If", ["c"], ["y"], then_branch=SUBGRAPH, else_branch=SUBGRAPH)],
                {"": 17, "acme": 1},
            ),
        ),
        422,
        "model_invalid",
        needle="acme",
    ),
    Case(
        "model-unknown-standard-op",
        _model("m.onnx", _onnx([helper.make_node("NoSuchOp", ["x"], ["y"])])),
        422,
        "model_invalid",
        needle="onnx.checker",
    ),
    Case(
        "model-undefined-input",
        _model("m.onnx", _onnx([helper.make_node("Add", ["x", "ghost"], ["y"])])),
        422,
        "model_invalid",
    ),
    Case(
        "model-weights-shorter-than-shape",
        _model("m.onnx", _short_weights()),
        422,
        "model_invalid",
        needle="bytes of data",
    ),
    Case("zip-dotdot", _model("m.zip", _zip({"../evil.onnx": TINY})), 422, "archive_invalid"),
    Case("zip-absolute", _model("m.zip", _zip({"/tmp/evil.onnx": TINY})), 422, "archive_invalid"),
    Case(
        "zip-backslash-dotdot",
        _model("m.zip", _zip({"a\\..\\..\\evil.onnx": TINY})),
        422,
        "archive_invalid",
    ),
    Case(
        "zip-symlink",
        _model("m.zip", _symlink_zip("w.bin")),
        422,
        "archive_invalid",
        needle="symbolic link",
    ),
    Case(
        "zip-encrypted",
        _model("m.zip", _encrypted_zip("m.onnx", TINY)),
        422,
        "archive_invalid",
        needle="encrypted",
    ),
    Case(
        "zip-duplicate-names",
        _model("m.zip", _duplicate_zip("m.onnx", TINY)),
        422,
        "archive_invalid",
    ),
    Case(
        "zip-two-models",
        _model("m.zip", _zip({"a.onnx": TINY, "b.onnx": TINY})),
        422,
        "model_invalid",
        needle="exactly one",
    ),
    Case("zip-no-model", _model("m.zip", _zip({"w.bin": b"0" * 10})), 422, "model_invalid"),
    Case("zip-truncated", _model("m.zip", b"PK\x03\x04 truncated"), 422, "archive_invalid"),
    Case(
        "zip-bomb-model", _model("m.zip", _bomb("w.bin")), 422, "archive_invalid", needle="expands"
    ),
    Case(
        "zip-external-escape",
        _model("m.zip", _external_zip("../../w.bin")),
        422,
        "model_invalid",
        needle="outside the model's folder",
    ),
    Case(
        "zip-external-absolute",
        _model("m.zip", _external_zip("/etc/passwd")),
        422,
        "model_invalid",
        needle="outside",
    ),
    Case(
        "zip-external-missing",
        _model("m.zip", _external_zip("gone.bin", with_file=False)),
        422,
        "model_invalid",
        needle="missing",
    ),
    Case(
        "zip-external-too-short",
        _model("m.zip", _external_zip("w.bin", file_bytes=16)),
        422,
        "model_invalid",
        needle="bytes at offset",
    ),
    Case(
        "upload-not-multipart",
        _raw(
            "POST",
            "/v1/models",
            content=b"raw bytes",
            headers={"content-type": "application/octet-stream"},
        ),
        400,
        "upload_invalid",
    ),
    Case("upload-no-file-part", _raw("POST", "/v1/models", data={"x": "1"}), 400, "upload_invalid"),
    # -- datasets --------------------------------------------------------------------------------
    Case("dataset-suffix", _dataset("calib.txt", b"1,2,3"), 422, "dataset_invalid"),
    Case(
        "dataset-pickle-npy",
        _dataset("d.npy", _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)),
        422,
        "dataset_invalid",
        needle="pickled",
    ),
    Case(
        "dataset-pickle-in-npz",
        _dataset(
            "d.npz",
            _zip(
                {"image.npy": _npy(np.array([None, 1], dtype=object), allow_pickle=True)},
                zipfile.ZIP_STORED,
            ),
        ),
        422,
        "dataset_invalid",
        needle="pickled",
    ),
    Case(
        "dataset-truncated-npz", _dataset("d.npz", dataset_bytes(4)[:-200]), 422, "archive_invalid"
    ),
    Case(
        "dataset-fortran",
        _dataset("d.npy", _npy(np.asfortranarray(np.ones((4, 3), np.float32)))),
        422,
        "dataset_invalid",
        needle="Fortran",
    ),
    Case(
        "dataset-scalar",
        _dataset("d.npy", _npy(np.float32(1.0))),
        422,
        "dataset_invalid",
        needle="scalar",
    ),
    Case(
        "dataset-strings",
        _dataset("d.npy", _npy(np.array(["a", "b"]))),
        422,
        "dataset_invalid",
        needle="dtype",
    ),
    Case(
        "dataset-empty-npz", _dataset("d.npz", _zip({}, zipfile.ZIP_STORED)), 422, "dataset_invalid"
    ),
    Case(
        "dataset-mixed-zip",
        _dataset("d.zip", _zip({"a.npy": _npy(np.ones((2, 2))), "b.png": _png(4, 4)})),
        422,
        "dataset_invalid",
        needle="only",
    ),
    Case(
        "dataset-images-without-preprocess",
        _dataset("d.zip", _image_zip()),
        422,
        "dataset_invalid",
        field="preprocess",
    ),
    Case(
        "dataset-resize-8000",
        _dataset("d.zip", _image_zip(), preprocess='{"resize_shorter": 8000}'),
        422,
        "dataset_invalid",
        field="preprocess.resize_shorter",
        needle="64,000,000",
    ),
    Case(
        "dataset-crop-5000",
        _dataset("d.zip", _image_zip(), preprocess='{"center_crop": [5000, 5000]}'),
        422,
        "dataset_invalid",
        field="preprocess.center_crop",
    ),
    Case(
        "dataset-thin-image-resized",
        _dataset("d.zip", _zip({"thin.png": _png(2000, 2)}), preprocess='{"resize_shorter": 512}'),
        422,
        "dataset_invalid",
        field="preprocess.resize_shorter",
    ),
    Case(
        "dataset-preprocess-not-json",
        _dataset("d.zip", _image_zip(), preprocess="{nope"),
        422,
        "dataset_invalid",
        field="preprocess",
    ),
    Case(
        "dataset-preprocess-unknown-field",
        _dataset("d.zip", _image_zip(), preprocess='{"sharpen": true}'),
        422,
        "dataset_invalid",
        field="preprocess",
    ),
    Case("dataset-nan", _dataset("d.npz", _nan_dataset()), 422, "dataset_invalid", needle="NaN"),
    Case(
        "dataset-wrong-names-for-model",
        _dataset(
            "d.npz", npz_bytes(pixels=np.zeros((2, 3, 16, 16), np.float32)), model_id="@model"
        ),
        422,
        "dataset_invalid",
        needle="missing 'image'",
    ),
    Case(
        "dataset-wrong-shape-for-model",
        _dataset("d.npz", npz_bytes(image=np.zeros((2, 3, 8, 8), np.float32)), model_id="@model"),
        422,
        "dataset_invalid",
        field="image",
    ),
    Case(
        "dataset-zip-dotdot",
        _dataset("d.zip", _zip({"../x.npz": dataset_bytes(2)})),
        422,
        "archive_invalid",
    ),
    Case("dataset-zip-symlink", _dataset("d.zip", _symlink_zip("x.npz")), 422, "archive_invalid"),
    Case(
        "dataset-zip-bomb",
        _dataset("d.zip", _bomb("x.npz")),
        422,
        "archive_invalid",
        needle="expands",
    ),
    Case(
        "dataset-shard-member-over-limit",
        _dataset("d.zip", _bomb("big.npz", 272 * MiB)),
        422,
        "archive_invalid",
        needle="per member",
    ),
    # -- builds ------------------------------------------------------------------------------------
    Case(
        "build-benchmark-batch-over-setting",
        _build(benchmark={"batch_size": 512}),
        422,
        "limit_exceeded",
        field="benchmark.batch_size",
        needle="TRTFORGE_MAX_BENCHMARK_BATCH",
    ),
    Case(
        "build-benchmark-batch-100000",
        _build(benchmark={"batch_size": 100_000}),
        422,
        "request_invalid",
        field="benchmark.batch_size",
    ),
    Case(
        "build-iterations-over-setting",
        _build(benchmark={"iterations": 5000}),
        422,
        "limit_exceeded",
        field="benchmark.iterations",
    ),
    Case(
        "build-iterations-1e12",
        _build(benchmark={"iterations": 10**12}),
        422,
        "request_invalid",
        field="benchmark.iterations",
    ),
    Case(
        "build-duration-over-setting",
        _build(benchmark={"duration_s": 120}),
        422,
        "limit_exceeded",
        field="benchmark.duration_s",
    ),
    Case(
        "build-warmup-over-setting",
        _build(benchmark={"warmup_ms": 20_000.5}),
        422,
        "limit_exceeded",
        field="benchmark.warmup_ms",
        needle="TRTFORGE_MAX_BENCHMARK_WARMUP_MS",
    ),
    Case(
        "build-calibration-batch-over-setting",
        _build(calibration={"batch_size": 128}),
        422,
        "limit_exceeded",
        field="calibration.batch_size",
    ),
    Case(
        "build-calibration-samples-over-setting",
        _build(calibration={"max_samples": 5000}),
        422,
        "limit_exceeded",
        field="calibration.max_samples",
    ),
    Case(
        "build-accuracy-samples-over-setting",
        _build(accuracy={"max_samples": 5000}),
        422,
        "limit_exceeded",
        field="accuracy.max_samples",
    ),
    Case(
        "build-seed-negative",
        _build(accuracy={"seed": -1}),
        422,
        "request_invalid",
        field="accuracy.seed",
    ),
    Case(
        "build-keep-backreference",
        _build(spec={"keep": {"int8": ["re:(a)\\1"]}}),
        422,
        "request_invalid",
        field="spec.keep.int8",
        needle="RE2",
    ),
    Case(
        "build-keep-lookahead",
        _build(spec={"keep": {"fp16": ["re:(?=conv)c"]}}),
        422,
        "request_invalid",
        field="spec.keep.fp16",
    ),
    Case(
        "build-keep-too-long",
        _build(spec={"keep": {"int8": ["x" * 5000]}}),
        422,
        "request_invalid",
        field="spec.keep.int8",
    ),
    Case(
        "build-keep-no-match",
        _build(spec={"keep": {"int8": ["no_such_node"]}}),
        422,
        "spec_invalid",
        needle="matches no node",
    ),
    Case(
        "build-profile-min-over-max",
        _build(
            spec={
                "profiles": {
                    "image": {"min": [8, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [2, 3, 16, 16]}
                }
            }
        ),
        422,
        "request_invalid",
    ),
    Case(
        "build-profile-unknown-input",
        _build(
            spec={
                "profiles": {
                    "nope": {"min": [1, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}
                }
            }
        ),
        422,
        "spec_invalid",
    ),
    Case(
        "build-precision-unknown",
        _build(spec={"precision": "int3"}),
        422,
        "request_invalid",
        field="spec.precision",
    ),
    Case("build-extra-field", _build(spec={"turbo": True}), 422, "request_invalid"),
    Case(
        "build-unknown-model",
        _raw("POST", "/v1/builds", json={"model_id": "0" * 64, "dataset_id": "0" * 64}),
        404,
        "not_found",
    ),
    Case("build-unknown-table", _build(table_id="f" * 64), 404, "not_found"),
    Case(
        "build-body-not-object", _raw("POST", "/v1/builds", json=[1, 2, 3]), 422, "request_invalid"
    ),
    # -- queries and ranges ------------------------------------------------------------------------
    Case(
        "list-offset-1e30",
        _raw("GET", "/v1/models?offset=1e30"),
        422,
        "request_invalid",
        field="offset",
    ),
    Case(
        "list-limit-zero", _raw("GET", "/v1/builds?limit=0"), 422, "request_invalid", field="limit"
    ),
    Case(
        "artifact-of-unknown-build",
        _raw("GET", "/v1/builds/nope/artifact", headers={"range": "bytes=5-2"}),
        404,
        "not_found",
    ),
]


def _state(live: Live) -> tuple[list[str], dict[str, int]]:
    data = live.server.data_dir
    files = sorted(
        p.relative_to(data).as_posix()
        for folder in ("tmp", "blobs", "models", "datasets", "work", "tables")
        for p in (data / folder).rglob("*")
        if p.is_file()
    )
    totals = {
        kind: httpx.get(f"{live.server.url}/v1/{kind}", timeout=30).json()["total"]
        for kind in ("models", "datasets", "builds", "calibration-tables")
    }
    return files, totals


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_is_refused_with_the_envelope_and_leaves_nothing(
    live: Live, case: Case
) -> None:
    before = _state(live)
    response = case.send(live)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "hint"}  # and "field" when one is to blame
    assert error["code"] == case.code, error
    assert error["message"]
    if case.field is not None:
        assert error.get("field") == case.field, error
    assert case.needle in f"{error['message']} {error['hint']}", error
    assert str(live.server.data_dir) not in response.text  # no server paths
    assert _state(live) == before
    assert httpx.get(f"{live.server.url}/healthz", timeout=10).status_code == 200


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 60


# -- allowed sizes that amplify ------------------------------------------------------------------


def test_a_catastrophic_keep_regex_answers_at_once(live: Live) -> None:
    model = _upload(live.server, "/v1/models", "long.onnx", _relu())
    data = _upload(
        live.server,
        "/v1/datasets",
        "x.npz",
        npz_bytes(x=np.ones((4, 4), np.float32)),
        model_id=model["id"],
    )
    before = _state(live)
    started = time.monotonic()
    response = live.post(
        "/v1/builds",
        json={
            "model_id": model["id"],
            "dataset_id": data["id"],
            "spec": {"keep": {"int8": ["re:(a+)+"]}},
        },
    )
    took = time.monotonic() - started
    assert response.status_code == 422, response.text  # the pattern matches no node
    assert "matches no node" in response.json()["error"]["message"]
    assert took < 2.0  # Python's re needs seconds on 'a'*27 + '!' (doubling per character)
    assert _state(live) == before


def _stored_shard_in_deflated_zip(samples: int) -> bytes:
    """A zip (a few hundred kB) holding one stored .npz of ``samples`` zero images."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (samples, 3, 16, 16)}
    )
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as outer,
        outer.open("shard.npz", "w", force_zip64=True) as member,
        zipfile.ZipFile(member, "w", zipfile.ZIP_STORED, allowZip64=True) as inner,
        inner.open("image.npy", "w", force_zip64=True) as array,
    ):
        array.write(header.getvalue())
        rows = bytes(3 * 16 * 16 * 4 * 1024)
        for _ in range(samples // 1024):
            array.write(rows)
    return buffer.getvalue()


def test_a_large_shard_in_a_small_zip_is_read_lazily(live: Live) -> None:
    payload = _stored_shard_in_deflated_zip(64 * 1024)  # 192 MiB of samples
    assert len(payload) < MiB
    assert live.server.process is not None
    with _PeakRss(live.server.process.pid) as rss:
        body = _upload(live.server, "/v1/datasets", "shards.zip", payload)
    assert body["num_samples"] == 64 * 1024
    assert rss.growth_mb < 120, rss.growth_mb  # before: the shard read whole, twice


def test_a_large_model_is_checked_without_loading_it_whole(live: Live) -> None:
    side = 3072  # 36 MiB of weights
    weight = numpy_helper.from_array(np.ones((side, side), np.float32), "w")
    data = _onnx(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        initializers=[weight],
        width=side,
    )
    del weight
    assert live.server.process is not None
    with _PeakRss(live.server.process.pid) as rss:
        body = _upload(live.server, "/v1/models", "big.onnx", data)
    assert body["inputs"][0]["shape"] == ["n", side]
    assert rss.growth_mb < 30, rss.growth_mb  # before: the file held twice and more


def _constant_of_shape_model() -> bytes:
    """x + sum(ConstantOfShape([20000, 20000])): 200 bytes that need 1.6 GB to run."""
    shape = numpy_helper.from_array(np.array([20000, 20000], np.int64), "shape")
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _onnx(nodes, initializers=[shape])


def _wait(live: Live, build_id: str, timeout_s: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body: dict[str, object] = httpx.get(
            f"{live.server.url}/v1/builds/{build_id}", timeout=30
        ).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.3)
    raise AssertionError(f"build {build_id} did not end:\n{live.server.log()}")


def test_a_build_over_its_memory_limit_fails_with_resource_limit_and_the_worker_goes_on(
    live: Live,
) -> None:
    model = _upload(live.server, "/v1/models", "cos.onnx", _constant_of_shape_model())
    data = _upload(
        live.server,
        "/v1/datasets",
        "x.npz",
        npz_bytes(x=np.ones((4, 4), np.float32) * 2),
        model_id=model["id"],
    )
    fast = {"warmup_ms": 0, "iterations": 1, "duration_s": 0}
    response = live.post(
        "/v1/builds",
        json={
            "model_id": model["id"],
            "dataset_id": data["id"],
            "benchmark": fast,
            "spec": {"precision": "fp32", "backend": "onnxruntime"},
        },
    )
    assert response.status_code == 202, response.text
    ended = _wait(live, response.json()["id"])
    assert ended["status"] == "failed", ended
    error = ended["error"]
    assert isinstance(error, dict)
    assert error["code"] == "resource_limit", error
    assert f"{BUILD_MEMORY:,}" in error["message"]
    assert "TRTFORGE_BUILD_MEMORY_BYTES" in error["hint"]
    # the worker survived: the next build runs to the end
    response = live.post(
        "/v1/builds",
        json={
            "model_id": live.model_id,
            "dataset_id": live.dataset_id,
            "benchmark": fast,
            "spec": {"precision": "fp32", "backend": "onnxruntime"},
        },
    )
    assert response.status_code in (200, 202), response.text
    assert _wait(live, response.json()["id"])["status"] == "succeeded"
    assert httpx.get(f"{live.server.url}/healthz", timeout=10).status_code == 200
