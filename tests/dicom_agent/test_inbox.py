"""The drafts folder reader: stability, validation, rejection, de-duplication, no overwrite."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

import dicom_agent.inbox as inbox_mod
from dicom_agent.config import AgentSettings
from dicom_agent.inbox import (
    DraftReader,
    Observation,
    is_stable,
    key_of_name,
    observe,
    safe_name,
)
from dicom_agent.state import StateDB

UID = "1.2.826.0.1.3680043.8.498.1"
SECRET = "Patient SENTINEL^PHI^DONOTLOG has a small effusion."


@pytest.fixture
def reader(settings: AgentSettings) -> DraftReader:
    s = settings.model_copy(update={"drafts": settings.drafts.model_copy(
        update={"stable_seconds": 1.0, "max_bytes": 200})})
    return DraftReader(s, StateDB(s.paths.state))


def poll_until_read(reader: DraftReader, t: float = 0.0):  # two polls, stable_seconds apart
    reader.poll(t)
    return reader.poll(t + 1.0)


def folder(reader: DraftReader) -> Path:
    return reader.folder


class TestStability:
    def test_observe_keeps_since_while_unchanged(self) -> None:
        first = observe(None, 10, 5, now=1.0)
        assert observe(first, 10, 5, now=2.0) is first
        assert observe(first, 11, 5, now=2.0) == Observation(11, 5, 2.0)

    def test_stable_needs_a_previous_identical_poll_and_the_delay(self) -> None:
        obs = Observation(10, 5, since=1.0)
        assert not is_stable(None, obs, 9.0, 1.0)
        assert not is_stable(obs, obs, 1.5, 1.0)
        assert is_stable(obs, obs, 2.0, 1.0)

    def test_file_growing_between_polls_is_not_read(self, reader: DraftReader) -> None:
        path = folder(reader) / "ACC1.txt"
        path.write_text("No eff")
        reader.poll(0.0)
        with path.open("a") as fh:
            fh.write("usion.")
        os.utime(path, ns=(1, 2_000_000_000))
        assert reader.poll(1.0).accepted == []
        assert path.exists()
        assert len(reader.poll(2.0).accepted) == 1
        (row,) = reader.db.drafts()
        assert row.text == "No effusion."

    def test_draft_rewritten_during_the_read_is_retried(
        self, reader: DraftReader, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = folder(reader) / "ACC2.txt"
        path.write_text("first")
        real = inbox_mod._read_at_most
        calls = []

        def racing_read(fd: int, limit: int) -> bytes:
            data = real(fd, limit)
            if not calls:
                calls.append(1)
                path.write_text("first and more")
            return data

        monkeypatch.setattr(inbox_mod, "_read_at_most", racing_read)
        report = poll_until_read(reader)
        assert (report.retried, report.accepted) == (1, [])
        report = poll_until_read(reader, 5.0)
        assert len(report.accepted) == 1
        assert reader.db.drafts()[0].text == "first and more"

    def test_hidden_tmp_part_and_symlinks_are_left_alone(self, reader: DraftReader) -> None:
        d = folder(reader)
        for name in (".ACC3.txt", "ACC3.txt.tmp", "ACC3.part"):
            (d / name).write_text("x")
        (d / "ACC4.txt").symlink_to(d / ".ACC3.txt")
        report = poll_until_read(reader)
        assert report.accepted == [] and report.rejected == []
        assert sorted(p.name for p in d.iterdir() if p.is_file() or p.is_symlink()) == [
            ".ACC3.txt", "ACC3.part", "ACC3.txt.tmp", "ACC4.txt"]

    def test_draft_swapped_for_a_symlink_after_the_poll_is_not_followed(
        self, reader: DraftReader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The race the lstat in poll() cannot close: the name becomes a symlink (same size,
        same mtime as the target) between the stability check and the read."""
        outside = tmp_path / "outside.txt"
        outside.write_text(SECRET)
        path = folder(reader) / "ACC6.txt"
        path.write_text(SECRET.replace("S", "s"))  # same length as the secret
        real_is_stable = inbox_mod.is_stable

        def swap_then_decide(*args: object) -> bool:
            stable = real_is_stable(*args)  # type: ignore[arg-type]
            if stable and not path.is_symlink():
                st = path.stat()
                path.unlink()
                path.symlink_to(outside)
                os.utime(outside, ns=(st.st_atime_ns, st.st_mtime_ns))
            return stable

        monkeypatch.setattr(inbox_mod, "is_stable", swap_then_decide)
        report = poll_until_read(reader)
        assert report.accepted == [] and report.rejected == []
        assert reader.db.drafts() == []
        assert path.is_symlink() and outside.read_text() == SECRET
        assert not (folder(reader) / "processed").exists()


class TestAccepted:
    def test_txt_by_accession_is_recorded_with_its_hash_and_moved(self, reader: DraftReader) -> None:
        (folder(reader) / "ACC5.txt").write_text("Small left effusion.")
        report = poll_until_read(reader)
        (row,) = reader.db.drafts()
        assert report.accepted == [row.id]
        assert (row.key, row.key_kind, row.state) == ("ACC5", "accession", "pending")
        assert len(row.sha256) == 64
        assert (folder(reader) / "processed" / "ACC5.txt").read_text() == "Small left effusion."
        assert not (folder(reader) / "ACC5.txt").exists()

    def test_json_with_study_uid_and_author(self, reader: DraftReader) -> None:
        doc = {"study_instance_uid": UID, "accession_number": "A9", "text": "Normal.", "author": "dr"}
        (folder(reader) / "anything.json").write_text(json.dumps(doc))
        poll_until_read(reader)
        (row,) = reader.db.drafts()
        assert (row.key, row.key_kind, row.text, row.author) == (UID, "study_uid", "Normal.", "dr")

    def test_identical_copy_is_a_no_op_and_never_overwrites(self, reader: DraftReader) -> None:
        d = folder(reader)
        (d / "ACC6.txt").write_text("Normal.")
        poll_until_read(reader)
        (d / "ACC6.txt").write_text("Normal.")
        report = poll_until_read(reader, 10.0)
        assert report.duplicates == 1 and report.accepted == []
        assert len(reader.db.drafts()) == 1
        assert len(list((d / "processed").iterdir())) == 2  # both kept, under distinct names

    def test_new_version_supersedes_the_old(self, reader: DraftReader) -> None:
        d = folder(reader)
        (d / "ACC7.txt").write_text("Normal.")
        poll_until_read(reader)
        (d / "ACC7.txt").write_text("Right pneumothorax.")
        poll_until_read(reader, 10.0)
        states = [(r.text, r.state) for r in reader.db.drafts()]
        assert states == [("Normal.", "superseded"), ("Right pneumothorax.", "pending")]
        names = {p.name for p in (d / "processed").iterdir()}
        assert "ACC7.txt" in names and len(names) == 2
        newest = reader.db.drafts()[-1]
        assert (d / "processed" / newest.file_name).read_text() == "Right pneumothorax."


class TestRejected:
    @pytest.mark.parametrize(
        ("name", "content", "reason"),
        [
            ("ACC8.txt", b"", "empty"),
            ("ACC8.txt", b"  \n\t", "empty"),
            ("ACC8.txt", b"x" * 201, "too_large"),
            ("ACC8.txt", b"\xff\xfe\xfa bad", "not_utf8"),
            ("bad name!.txt", b"Normal.", "bad_name"),
            ("ACC-TOO-LONG-FOR-SH.txt", b"Normal.", "bad_name"),  # SH: at most 16 characters
            ("ACC8.json", b"{not json", "bad_json"),
            ("ACC8.json", b'{"text": "x"}', "bad_json"),
            ("ACC8.json", b'{"accession_number": "A1", "text": "x", "extra": 1}', "bad_json"),
            ("ACC8.json", b'{"study_instance_uid": "abc", "text": "x"}', "bad_json"),
            ("ACC8.docx", b"Normal.", "unsupported_type"),
        ],
    )
    def test_bad_drafts_go_to_rejected_with_a_reason(
        self, reader: DraftReader, name: str, content: bytes, reason: str
    ) -> None:
        (folder(reader) / name).write_bytes(content)
        report = poll_until_read(reader)
        assert report.rejected == [reason]
        rejected = folder(reader) / "rejected"
        moved = [p for p in rejected.iterdir() if not p.name.endswith(".reason.txt")]
        assert len(moved) == 1 and moved[0].read_bytes() == content
        note = (rejected / (moved[0].name + ".reason.txt")).read_text()
        assert note.startswith(f"reason: {reason}\n")
        assert reader.db.drafts() == []

    def test_reason_file_and_log_never_quote_the_draft(
        self, reader: DraftReader, caplog: pytest.LogCaptureFixture
    ) -> None:
        doc = {"study_instance_uid": SECRET, "text": SECRET}
        (folder(reader) / "SENTINEL.json").write_text(json.dumps(doc))
        with caplog.at_level(logging.DEBUG):
            assert poll_until_read(reader).rejected == ["bad_json"]
        note = next((folder(reader) / "rejected").glob("*.reason.txt")).read_text()
        assert "study_instance_uid" in note and "SENTINEL" not in note
        assert "SENTINEL" not in caplog.text and "SENTINEL" not in caplog.text

    def test_same_name_rejected_twice_keeps_both(self, reader: DraftReader) -> None:
        for t in (0.0, 10.0):
            (folder(reader) / "ACC9.txt").write_bytes(b"")
            poll_until_read(reader, t)
        (folder(reader) / "ACC9.txt").write_bytes(b"  ")
        poll_until_read(reader, 20.0)
        files = [p for p in (folder(reader) / "rejected").iterdir() if not p.name.endswith(".reason.txt")]
        assert len(files) == 3 and len({p.name for p in files}) == 3


class TestNames:
    @pytest.mark.parametrize(
        ("stem", "expected"),
        [
            (UID, (UID, "study_uid")),
            ("ACC-12_3.4", ("ACC-12_3.4", "accession")),
            ("12345678", ("12345678", "accession")),
            ("A" * 17, None),
            ("1." + "2" * 70, None),
            ("..", None),
            ("a/b", None),
        ],
    )
    def test_key_of_name(self, stem: str, expected: tuple[str, str] | None) -> None:
        assert key_of_name(stem) == expected

    def test_safe_name_strips_traversal_and_odd_characters(self) -> None:
        assert safe_name("../../etc/pass wd\n.txt") == "_.._etc_pass_wd_.txt"
        assert "/" not in safe_name("a/b") and not safe_name("..x").startswith(".")


class TestFileErrors:
    @pytest.mark.parametrize("stage", ["read", "move"])
    def test_os_errors_are_retried_and_never_name_the_file(
        self,
        reader: DraftReader,
        stage: str,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An unreadable or unmovable draft is retried later; the log line has no file name
        (a draft's name is its accession number)."""
        (folder(reader) / "ACC77665544.txt").write_text("Small left effusion.")
        path_error = FileNotFoundError(2, "No such file or directory", "drafts/ACC77665544.txt")

        def boom(*args: object, **kwargs: object) -> object:
            raise path_error

        if stage == "read":
            monkeypatch.setattr(reader, "_read_stable", boom)
        else:
            monkeypatch.setattr(inbox_mod, "_move_unique", boom)
        with caplog.at_level(logging.DEBUG):
            poll_until_read(reader)
        assert "ACC77665544" not in caplog.text
        assert "No such file or directory" in caplog.text
        monkeypatch.undo()
        poll_until_read(reader, t=10.0)  # the next polls file it
        assert (folder(reader) / "processed" / "ACC77665544.txt").exists()
