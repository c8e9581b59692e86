from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import Settings, is_loopback, load_settings


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_defaults_serve_loopback_with_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.auth_required is False
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'trtforge.db').resolve()}"
    assert settings.base_url == "http://127.0.0.1:8000"


def test_non_loopback_bind_turns_auth_on_and_refuses_it_off(tmp_path: Path) -> None:
    assert Settings(host="0.0.0.0", data_dir=tmp_path).auth_required is True
    with pytest.raises(SettingsError, match="auth cannot be off") as info:
        load_settings(host="0.0.0.0", auth=False, data_dir=tmp_path)
    assert "0.0.0.0" in info.value.message


def test_auth_can_be_enabled_on_loopback(tmp_path: Path) -> None:
    assert Settings(auth=True, data_dir=tmp_path).auth_required is True


def test_environment_variables_are_read_and_overrides_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTFORGE_PORT", "9123")
    monkeypatch.setenv("TRTFORGE_MAX_UPLOAD_BYTES", "1024")
    settings = load_settings(data_dir=tmp_path, port=None)
    assert (settings.port, settings.max_upload_bytes) == (9123, 1024)
    assert load_settings(data_dir=tmp_path, port=9999).port == 9999


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"database_url": "mysql://x/y"}, "database_url"),
        ({"max_upload_bytes": 0}, "max_upload_bytes"),
        ({"port": 70000}, "port"),
        ({"heartbeat_s": 10.0, "stale_after_s": 15.0}, "settings"),
    ],
)
def test_unsafe_values_are_refused_naming_the_setting(
    tmp_path: Path, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(data_dir=tmp_path, **overrides)
    assert info.value.field == field
    assert info.value.message.startswith(f"Setting {field}")


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SettingsError, match="not a directory"):
        load_settings(data_dir=file)


def test_settings_round_trip_as_json_for_build_processes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, workers=3, database_url="sqlite:///x.db")
    again = Settings.model_validate(settings.model_dump(mode="json"))
    assert again == settings
