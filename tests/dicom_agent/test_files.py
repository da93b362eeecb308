"""Atomic writes: whole file or old file, never a half one, and no temp files left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_agent.files import atomic_write_bytes, atomic_write_text


class TestAtomicWrite:
    def test_creates_parent_and_replaces_content(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / "out.json"
        atomic_write_text(path, "first")
        atomic_write_bytes(path, b"second")
        assert path.read_bytes() == b"second"
        assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]

    def test_failed_rename_keeps_old_file_and_removes_temp(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "out.txt"
        atomic_write_text(path, "old")

        def no_replace(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", no_replace)
        with pytest.raises(OSError, match="No space left"):
            atomic_write_text(path, "new")
        assert path.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]

    def test_text_is_utf8(self, tmp_path: Path) -> None:
        path = atomic_write_text(tmp_path / "t.txt", "Größe – ok")
        assert path.read_bytes() == "Größe – ok".encode()
