"""The unit tier stays light: a test not marked ``slow`` cannot train or export with torch.

tests/conftest.py refuses zoo's torch builders (zoo.HEAVY_BUILDERS) during the setup and call of
every test not marked ``slow``, and refuses such tests the fixtures that hold those models (whose
value a slow test may already have built). This test is itself not slow, so the refusal is in
force here.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from tests import zoo


def _builders_importing_torch() -> list[str]:
    """zoo's public functions whose body imports torch (read from the source, not trusted)."""
    found = []
    for node in ast.parse(inspect.getsource(zoo)).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                modules = [alias.name for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                modules = [sub.module or ""]
            else:
                continue
            if any(m == "torch" or m.startswith("torch.") for m in modules):
                found.append(node.name)
                break
    return found


def test_every_builder_that_imports_torch_is_refused_to_light_tests() -> None:
    importing = _builders_importing_torch()
    assert {"fashion_cnn", "efficientnet_lite0", "minilm"} <= set(importing)
    assert sorted(zoo.HEAVY_BUILDERS) == sorted(importing)


@pytest.mark.parametrize("name", sorted(zoo.HEAVY_BUILDERS))
def test_a_light_test_calling_a_torch_builder_fails(name: str) -> None:
    # refused before the cache is consulted: an exported model on disk does not make it light
    with pytest.raises(zoo.HeavyBuildRefused, match=rf"zoo\.{name}\(\).*not marked slow"):
        getattr(zoo, name)()


def test_the_guard_fails_light_tests_by_every_route_and_spares_slow_ones(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    slow: long-running\n")
    pytester.makeconftest(
        '''
        from pathlib import Path

        import pytest

        from tests.conftest import pytest_runtest_call, pytest_runtest_setup


        @pytest.fixture(scope="session")
        def minilm_path() -> Path:
            """Stands in for an export that an earlier slow test already paid for."""
            return Path("minilm.onnx")
        '''
    )
    pytester.makepyfile(
        test_tier="""
        import pytest

        from tests import zoo


        @pytest.fixture(scope="module")
        def exported():
            return zoo.efficientnet_lite0()


        def test_light_calls_a_builder():
            zoo.fashion_cnn()


        def test_light_module_fixture_builds(exported):
            pass


        def test_light_requests_a_cached_heavy_fixture(minilm_path):
            pass


        @pytest.mark.slow
        def test_slow_requests_it(minilm_path):
            assert minilm_path.name == "minilm.onnx"


        @pytest.mark.slow
        def test_slow_may_build(monkeypatch, tmp_path):
            monkeypatch.setattr(zoo, "cache_dir", lambda: tmp_path)
            (tmp_path / "fashion_cnn.onnx").write_bytes(b"cached")
            assert zoo.fashion_cnn() == tmp_path / "fashion_cnn.onnx"
        """
    )
    reports = pytester.inline_run("-p", "no:cacheprovider").getreports("pytest_runtest_logreport")
    passed = sorted(r.nodeid.rpartition("::")[2] for r in reports if r.passed and r.when == "call")
    failed = {r.nodeid.rpartition("::")[2]: (r.when, r.longreprtext) for r in reports if r.failed}
    assert passed == ["test_slow_may_build", "test_slow_requests_it"]
    expected = {  # the phase it fails in, and what was refused
        "test_light_calls_a_builder": ("call", "zoo.fashion_cnn()"),
        "test_light_module_fixture_builds": ("setup", "zoo.efficientnet_lite0()"),
        "test_light_requests_a_cached_heavy_fixture": ("setup", "fixture minilm_path"),
    }
    assert sorted(failed) == sorted(expected)
    for name, (when, what) in expected.items():
        assert failed[name][0] == when, name
        message = f"HeavyBuildRefused: {what} trains or exports with torch; test_tier.py::{name} "
        assert message + "is not marked slow: mark it @pytest.mark.slow" in failed[name][1]
