"""Names and tags of models and datasets (upload form fields, PATCH, list filters; builds listed
by them), HEAD on artifacts, and hints that speak REST."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.hints import rest_hint
from tests.unit.service.support import dataset_bytes, model_bytes, zip_bytes


def _upload_model(client: TestClient, filename: str = "tiny.onnx", **fields: str) -> dict:
    answer = client.post("/v1/models", files={"file": (filename, model_bytes())}, data=fields)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def test_a_model_carries_its_file_name_and_the_name_and_tags_given_at_upload(
    client: TestClient,
) -> None:
    model = _upload_model(client, name=" ResNet tiny ", tags="vision, team:cv,vision")
    assert (model["filename"], model["name"], model["tags"]) == (
        "tiny.onnx",
        "ResNet tiny",
        ["team:cv", "vision"],
    )
    assert client.get(model["links"]["self"]).json()["tags"] == ["team:cv", "vision"]


def test_patch_sets_and_clears_a_models_name_and_tags(client: TestClient) -> None:
    model = _upload_model(client)
    assert (model["name"], model["tags"]) == (None, [])
    url = model["links"]["self"]
    patched = client.patch(url, json={"name": "detector", "tags": ["b", "a"]}).json()
    assert (patched["name"], patched["tags"]) == ("detector", ["a", "b"])
    only_tags = client.patch(url, json={"tags": ["c"]}).json()  # the name stays
    assert (only_tags["name"], only_tags["tags"]) == ("detector", ["c"])
    cleared = client.patch(url, json={"name": None, "tags": []}).json()
    assert (cleared["name"], cleared["tags"]) == (None, [])
    bad = client.patch(url, json={"tags": ["no spaces"]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "tags.0"
    unknown = client.patch("/v1/models/" + "0" * 64, json={"name": "x"})
    assert unknown.status_code == 404


def test_model_lists_filter_by_name_or_file_name_and_by_every_tag(client: TestClient) -> None:
    a = _upload_model(client, "alpha.onnx", name="Fast Detector", tags="det,v_1")
    b = client.post(
        "/v1/models", files={"file": ("beta.onnx", model_bytes(seed=1))}, data={"tags": "det"}
    ).json()

    def listed(query: str) -> list[str]:
        page = client.get(f"/v1/models?{query}").json()
        assert page["total"] == len(page["items"])
        return sorted(m["id"] for m in page["items"])

    assert listed("name=detector") == [a["id"]]  # any case, a substring of the name
    assert listed("name=BETA") == [b["id"]]  # or of the uploaded file's name
    assert listed("tag=det") == sorted([a["id"], b["id"]])
    assert listed("tag=det&tag=v_1") == [a["id"]]
    assert listed("tag=v%1") == []  # % and _ are literal, not LIKE wildcards
    assert listed("tag=v-1") == []


def test_a_bad_tag_at_upload_is_refused_and_nothing_is_stored(client: TestClient) -> None:
    answer = client.post(
        "/v1/models", files={"file": ("tiny.onnx", model_bytes())}, data={"tags": "ok,bad tag"}
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["field"] == "tags" and "'bad tag'" in error["message"]
    assert client.get("/v1/models").json()["total"] == 0


def test_datasets_carry_names_and_tags_and_filter_by_them(client: TestClient) -> None:
    first = client.post(
        "/v1/datasets",
        files={"file": ("calib.npz", dataset_bytes())},
        data={"name": "COCO calib 12", "tags": "coco,calib"},
    ).json()
    second = client.post("/v1/datasets", files={"file": ("eval.npz", dataset_bytes(seed=1))}).json()
    assert (first["filename"], first["name"], first["tags"]) == (
        "calib.npz",
        "COCO calib 12",
        ["calib", "coco"],
    )
    ids = [d["id"] for d in client.get("/v1/datasets?tag=coco").json()["items"]]
    assert ids == [first["id"]]
    ids = [d["id"] for d in client.get("/v1/datasets?name=EVAL").json()["items"]]
    assert ids == [second["id"]]
    patched = client.patch(second["links"]["self"], json={"name": "eval set", "tags": ["coco"]})
    assert patched.json()["name"] == "eval set"
    ids = sorted(d["id"] for d in client.get("/v1/datasets?tag=coco").json()["items"])
    assert ids == sorted([first["id"], second["id"]])


def test_uploading_the_same_bytes_again_with_a_name_names_the_existing_model(
    client: TestClient,
) -> None:
    first = _upload_model(client)
    again = client.post(
        "/v1/models", files={"file": ("tiny.onnx", model_bytes())}, data={"name": "named"}
    )
    assert again.status_code == 200
    assert (again.json()["id"], again.json()["name"]) == (first["id"], "named")


def test_head_on_an_unknown_builds_artifact_is_404_not_405(client: TestClient) -> None:
    answer = client.head("/v1/builds/" + "0" * 32 + "/artifact")
    assert answer.status_code == 404


def test_rest_hints_name_the_json_field_not_the_cli_option() -> None:
    assert rest_hint("Pass a preprocessing spec JSON (--preprocess SPEC.json).") == (
        'Pass a preprocessing spec JSON (the "preprocess" form field of POST /v1/datasets).'
    )
    assert rest_hint("Keep it out (--keep NODE) or --keep-fp16 Conv; --gate none accepts it.") == (
        'Keep it out (spec.keep.int8 [NODE]) or spec.keep.fp16 Conv; spec.gate "none" accepts it.'
    )
    assert rest_hint("Use --backend onnxruntime.") == 'Use spec.backend "onnxruntime".'
    assert rest_hint("Nothing to change here.") == "Nothing to change here."


def test_an_upload_error_reached_over_rest_speaks_rest(client: TestClient) -> None:
    images = zip_bytes({"a.png": b"\x89PNG\r\n\x1a\n", "b.png": b"\x89PNG\r\n\x1a\n"})
    answer = client.post("/v1/datasets", files={"file": ("images.zip", images)})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "preprocess"
    assert "--preprocess" not in error["hint"] and '"preprocess" form field' in error["hint"]


def test_builds_list_by_their_models_name_and_tags_precision_and_backend(
    client: TestClient,
) -> None:
    named = _upload_model(client, "alpha.onnx", name="Detector", tags="vision")
    client.post("/v1/models", files={"file": ("beta.onnx", model_bytes(seed=1))})
    data = client.post(
        "/v1/datasets", files={"file": ("d.npz", dataset_bytes())}, data={"model_id": named["id"]}
    ).json()
    fp16 = client.post(
        "/v1/builds",
        json={"model_id": named["id"], "dataset_id": data["id"], "spec": {"precision": "fp16"}},
    ).json()
    ort = client.post(
        "/v1/builds",
        json={"model_id": named["id"], "dataset_id": data["id"], "spec": {"backend": "onnxruntime"}},
    ).json()

    def listed(query: str) -> list[str]:
        return sorted(b["id"] for b in client.get(f"/v1/builds?{query}").json()["items"])

    assert listed("model_name=detect") == sorted([fp16["id"], ort["id"]])
    assert listed("model_name=ALPHA&model_tag=vision") == sorted([fp16["id"], ort["id"]])
    assert listed("model_name=beta") == [] and listed("model_tag=audio") == []
    assert listed("precision=fp16") == [fp16["id"]]
    assert listed("precision=int8-fp16&backend=onnxruntime") == [ort["id"]]
    assert client.get("/v1/builds?precision=int4").status_code == 422
