"""docker/: the Compose file against the Compose specification's schema and against the code, the
Kubernetes manifests, the Dockerfiles (hadolint and what the images must do).

No image is built here (no engine, no registry): these checks hold the files to what the code
reads (settings), what the images contain (the locked install step CI runs) and what the
deployment needs (health checks, a GPU reservation, one worker Deployment per GPU product).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
# images built from docker/ (compose's `image:` names; the manifests use the same ones)
IMAGES = {"trtforge-api", "trtforge-worker-cpu", "trtforge-worker-trt"}


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _schema_errors(document: object) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (compose's format: comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    """The environment compose gives a service: its env files' examples, then `environment`."""
    env: dict[str, str] = {}
    for name in service.get("env_file", []):
        example = DOCKER / f"{name}.example"
        assert example.is_file(), f"env_file {name}: commit {example.name} beside compose.yaml"
        env |= _env_file(example)
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env |= {key: str(value) for key, value in environment.items()}
    return env


def _setting_names() -> set[str]:
    return {f"TRTFORGE_{name.upper()}" for name in Settings.model_fields}


def _worker_option_names() -> set[str]:
    """The variables ``trtforge worker`` reads as command-line options (``--api``, ``--token``)."""
    from service.cli.server import worker

    return {
        envvar
        for param in worker.params
        for envvar in ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
    }


def _assert_settings(env: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every TRTFORGE_* variable is a Settings field (or an option of ``trtforge worker``), and
    together they make valid Settings."""
    ours = {key: value for key, value in env.items() if key.startswith("TRTFORGE_")}
    unknown = sorted(set(ours) - _setting_names() - _worker_option_names())
    assert not unknown, f"{where}: {unknown} are not fields of service.settings.Settings"
    with monkeypatch.context() as patch:
        for key in _setting_names():
            patch.delenv(key, raising=False)
        for key, value in ours.items():
            if key in _setting_names():
                patch.setenv(key, value)
        Settings()  # raises on a value the service would refuse at start


# -- compose.yaml ------------------------------------------------------------------------------


def test_the_vendored_schema_is_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"
    assert (SCHEMA.parent / "LICENSE").is_file()


def test_compose_file_follows_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


def test_the_schema_check_catches_a_malformed_compose_file() -> None:
    broken = copy.deepcopy(_compose())
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    broken["services"]["api"]["ports"] = [{"target": 8000, "exposed_on": "all"}]
    broken["services"]["api"]["restart_policy"] = "always"
    errors = _schema_errors(broken)
    assert any("devices" in error for error in errors), errors
    assert any("restart_policy" in error for error in errors), errors
    assert any("ports" in error for error in errors), errors


def test_compose_runs_postgres_the_api_a_cpu_worker_and_one_gpu_worker() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "api", "worker-cpu", "worker-gpu"}
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert not any("deploy" in services[name] for name in ("api", "worker-cpu"))
    assert {services[name]["image"] for name in ("api", "worker-cpu", "worker-gpu")} == IMAGES


def _stages(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I))


def _args(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)", dockerfile.read_text(), re.M))


def test_every_build_names_a_dockerfile_stage_and_arguments_that_exist() -> None:
    for name, service in _compose()["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        if "target" in build:
            assert build["target"] in _stages(dockerfile), f"{name}: no stage {build['target']}"
        unknown = set(build.get("args", {})) - _args(dockerfile)
        assert not unknown, f"{name}: {dockerfile.name} declares no ARG {sorted(unknown)}"


def test_compose_environment_is_trtforge_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if name != "postgres":
            _assert_settings(_service_env(service), f"compose service {name}", monkeypatch)
    api = _service_env(services["api"])
    assert api["TRTFORGE_DATABASE_URL"].startswith("postgresql+psycopg://")
    user = _env_file(DOCKER / "postgres.env.example")["POSTGRES_USER"]
    assert f"//{user}:" in api["TRTFORGE_DATABASE_URL"] and "@postgres:" in api["TRTFORGE_DATABASE_URL"]


def test_the_gpu_worker_reaches_its_builds_through_the_api_alone() -> None:
    services = _compose()["services"]
    env = _service_env(services["worker-gpu"])
    assert env["TRTFORGE_API_URL"] == "http://api:8000"  # the api service, on its port
    assert env["TRTFORGE_TOKEN"] and "TRTFORGE_DATABASE_URL" not in env
    mounts = [volume.split(":")[0] for volume in services["worker-gpu"]["volumes"]]
    data = [v.split(":")[0] for v in services["api"]["volumes"] if v.endswith(":/data")]
    assert data and not set(data) & set(mounts)  # no volume shared with the API
    assert set(services["worker-gpu"]["depends_on"]) == {"api"}


def test_the_environment_check_catches_an_unknown_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match="TRTFORGE_WORKER_COUNT"):
        _assert_settings({"TRTFORGE_WORKER_COUNT": "2"}, "test", monkeypatch)
    with pytest.raises(ValueError, match="port"):
        _assert_settings({"TRTFORGE_PORT": "0"}, "test", monkeypatch)


def test_secrets_come_from_env_files_that_git_ignores() -> None:
    services = _compose()["services"]
    assert all("env_file" in service for service in services.values())
    for service in services.values():
        env = service.get("environment", {})
        assert not any("PASSWORD" in key or "DATABASE_URL" in key for key in env)
    for name in {f for service in services.values() for f in service["env_file"]}:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(DOCKER / name)], cwd=ROOT, check=False
        )
        assert ignored.returncode == 0, f"docker/{name} holds secrets: git must ignore it"


def _check_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_health_checks_are_sane() -> None:
    services = _compose()["services"]
    api_check = _check_command(services["api"])
    assert "127.0.0.1:8000/healthz" in api_check
    assert services["api"]["ports"] == ["8000:8000"]
    assert _service_env(services["api"]).get("TRTFORGE_PORT", "8000") == "8000"
    assert "pg_isready" in _check_command(services["postgres"])
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    # the API migrates the database: workers start after it answers
    for worker in ("worker-cpu", "worker-gpu"):
        assert services[worker]["depends_on"]["api"] == {"condition": "service_healthy"}
    for check in (services["api"]["healthcheck"], services["postgres"]["healthcheck"]):
        assert check["retries"] >= 1 and check["interval"] and check["timeout"]


def test_the_api_serves_the_health_route_the_checks_call() -> None:
    from service.api.health import router

    assert "/healthz" in {getattr(route, "path", None) for route in router.routes}


# -- Dockerfiles ---------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: it comes with trtforge[dev] (bash scripts/setup-dev.sh)")
    return found


def _lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    config = DOCKER / "hadolint.yaml"
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(config), *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_dockerfile_passes_hadolint() -> None:
    assert len(DOCKERFILES) >= 2
    result = _lint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install numpy\nUSER root\n")
    result = _lint(bad)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3002" in result.stdout


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_from_the_lock_and_run_as_a_user(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    runs = " ".join(args for op, args in steps if op == "RUN")
    copies = [args for op, args in steps if op == "COPY" and "--from" not in args]
    assert "bash scripts/install-locked.sh" in runs
    assert "pip install" not in runs, "install through scripts/install-locked.sh (the lock)"
    assert any("requirements-lock.txt" in args for args in copies)
    for args in copies:
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for op, args in steps:
        if op == "ENV":
            names = re.findall(r"(TRTFORGE_[A-Z0-9_]+)=", args)
            assert set(names) <= _setting_names(), f"{dockerfile.name}: ENV {names}"


def test_the_api_image_checks_its_health_and_the_worker_image_is_nvidias() -> None:
    api = (DOCKER / "Dockerfile").read_text()
    assert {"api", "worker-cpu", "build", "runtime"} <= _stages(DOCKER / "Dockerfile")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", api, re.M)
    assert re.search(r"^HEALTHCHECK .*CMD .*127\.0\.0\.1:8000/healthz", api, re.M | re.S)
    trt = (DOCKER / "tensorrt.Dockerfile").read_text()
    assert re.search(r"^ARG TENSORRT_TAG=\S+\nFROM nvcr\.io/nvidia/tensorrt:\$\{TENSORRT_TAG\}", trt, re.M)
    assert "tensorrt.__version__" in trt and "TENSORRT_VERSION" in trt


def test_the_build_context_lets_in_what_the_images_copy() -> None:
    allowed = (ROOT / ".dockerignore").read_text()
    for dockerfile in DOCKERFILES:
        for op, args in _instructions(dockerfile):
            if op == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    assert f"!{source.rstrip('/')}" in allowed, f".dockerignore hides {source}"


# -- Kubernetes manifests -------------------------------------------------------------------------


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
            found.append((path.name, document))
    return found


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] != "Deployment":
        return []
    containers: list[dict[str, Any]] = document["spec"]["template"]["spec"]["containers"]
    return containers


def test_manifests_are_kubernetes_objects() -> None:
    documents = _documents()
    assert {"api.yaml", "workers.yaml"} <= {path.name for path in MANIFESTS}
    for name, document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
        if document["kind"] == "Deployment":
            spec = document["spec"]
            template_labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= template_labels.items(), name
            security = spec["template"]["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001


SECRETS = {"trtforge-env": "trtforge.env", "trtforge-worker-env": "worker.env"}
"""The manifests' Secrets and the env files they are made from (``--from-env-file``)."""


def test_manifest_environment_is_trtforge_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    claims = {d["metadata"]["name"] for _, d in _documents() if d["kind"] == "PersistentVolumeClaim"}
    for name, document in _documents():
        for container in _containers(document):
            assert container["image"] in IMAGES, f"{name}: {container['image']} is not built here"
            [source] = container["envFrom"]
            secret = _env_file(DOCKER / f"{SECRETS[source['secretRef']['name']]}.example")
            env = secret | {item["name"]: item["value"] for item in container.get("env", [])}
            _assert_settings(env, f"{name}: {document['metadata']['name']}", monkeypatch)
        if document["kind"] == "Deployment":
            for volume in document["spec"]["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_kubernetes_workers_need_neither_the_database_nor_a_shared_volume() -> None:
    services = {
        (d["metadata"]["name"], port["port"])
        for _, d in _documents()
        if d["kind"] == "Service"
        for port in d["spec"]["ports"]
    }
    workers = [
        (d, c)
        for _, d in _documents()
        for c in _containers(d)
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]
    assert len(workers) >= 3
    for document, container in workers:
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        url = re.fullmatch(r"http://([a-z0-9-]+)(?::(\d+))?", env["TRTFORGE_API_URL"])
        assert url is not None and (url[1], int(url[2] or 80)) in services, env
        assert container["envFrom"] == [{"secretRef": {"name": "trtforge-worker-env"}}]
        volumes = document["spec"]["template"]["spec"]["volumes"]
        assert all("persistentVolumeClaim" not in volume for volume in volumes)
    assert "TRTFORGE_TOKEN" in _env_file(DOCKER / "worker.env.example")
    assert "TRTFORGE_DATABASE_URL" not in _env_file(DOCKER / "worker.env.example")


def test_one_worker_deployment_per_gpu_product() -> None:
    products = []
    for name, document in _documents():
        for container in _containers(document):
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is None:
                continue
            selector = document["spec"]["template"]["spec"]["nodeSelector"]
            products.append(selector["nvidia.com/gpu.product"])
            assert container["image"] == "trtforge-worker-trt", name
            assert gpus == 1
    assert len(products) >= 2 and len(products) == len(set(products)), products
