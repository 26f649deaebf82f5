"""The local registry: aliases and the checkpoints dsv4 made, kept in one locked, atomically replaced file."""

from __future__ import annotations

import pytest

from dsv4cli.errors import UsageError
from dsv4cli.hub import registry


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


def test_outputs_are_recorded_newest_first_and_vanish_with_their_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert registry.record_output(a, "dsv4 quantize --recipe q3", "src") is None
    assert registry.record_output(b, "dsv4 convert --to dsv4", "src") is None
    assert registry.record_output(a, "dsv4 quantize --recipe q2", "src") is None  # replaces the older record
    assert [(o["path"], o["made_by"]) for o in registry.outputs()] == [(str(a), "dsv4 quantize --recipe q2"),
                                                                       (str(b), "dsv4 convert --to dsv4")]
    b.rmdir()
    assert [o["path"] for o in registry.outputs()] == [str(a)]


def test_an_unwritable_registry_is_a_warning_not_a_failure(tmp_path, data_home):
    (data_home / "dsv4" / "registry.json").mkdir(parents=True)  # a directory where the file should go
    out = tmp_path / "made"
    out.mkdir()
    warning = registry.record_output(out, "dsv4 convert --to dsv4", "src")
    assert warning is not None and "dsv4 list` will not show it" in warning


def test_aliases_are_checked_and_stored(tmp_path):
    registry.set_alias("mini", "demo")
    registry.set_alias("local", str(tmp_path / "model"))
    assert registry.aliases() == {"local": str(tmp_path / "model"), "mini": "demo"}
    for name in ("demo", "last", "a/b", "", "x" * 65):
        with pytest.raises(UsageError, match="cannot be an alias"):
            registry.set_alias(name, "demo")
    registry.remove_alias("mini")
    assert registry.alias_target("mini") is None
    with pytest.raises(UsageError, match="no alias"):
        registry.remove_alias("mini")


def test_a_corrupt_registry_is_a_clear_error(data_home):
    (data_home / "dsv4").mkdir(parents=True)
    (data_home / "dsv4" / "registry.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"registry .* is unreadable"):
        registry.aliases()
