"""Atomic writes (distillkit.files): whole or nothing, no temporary left behind, chosen modes."""

from __future__ import annotations

import stat

import pytest

from distillkit.config import RunConfig, save_config
from distillkit.files import atomic_path, write_text_atomically


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_completed_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.txt"
    write_text_atomically(target, "first")
    write_text_atomically(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_default_mode_is_what_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # open() under the current umask
    written = tmp_path / "written.txt"
    write_text_atomically(written, "x")
    assert _mode(written) == _mode(plain)


def test_an_explicit_mode_is_applied(tmp_path):
    secret = tmp_path / "keys.json"
    write_text_atomically(secret, "{}", mode=0o600)
    assert _mode(secret) == 0o600


def test_config_yaml_is_readable_like_the_checkpoints_beside_it(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    save_config(RunConfig(), tmp_path / "config.yaml", ["train"])
    assert _mode(tmp_path / "config.yaml") == _mode(plain)
