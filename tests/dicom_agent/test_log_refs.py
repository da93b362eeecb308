"""One study, one log reference: every line about a study carries the same ``study`` hash.

A draft named by accession number used to be logged with the hash of the accession number when
accepted and with the hash of the Study Instance UID when paired: two references for one study.
"""

from __future__ import annotations

import logging

import pytest

from dicom_agent.config import AgentSettings
from dicom_agent.inbox import DraftReader
from dicom_agent.observe import study_ref
from dicom_agent.scheduler import pair_drafts
from dicom_agent.state import StateDB

UID = "1.2.826.0.1.3680043.8.498.31"


def record_study(db: StateDB, uid: str, accession: str) -> None:
    db.record_instance(
        sop_instance_uid=uid + ".1", study_instance_uid=uid, series_instance_uid=uid + ".2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
        view_position="PA", body_part="CHEST", accession_number=accession, path=f"/{uid}.dcm",
        sha256=uid, size=1, now=0,
    )


def study_fields(caplog: pytest.LogCaptureFixture) -> dict[str, str | None]:
    return {r.event: getattr(r, "study", None) for r in caplog.records if hasattr(r, "event")}


@pytest.mark.parametrize("study_first", [True, False], ids=["study-then-draft", "draft-then-study"])
def test_a_draft_by_accession_is_logged_under_its_study_reference(
    settings: AgentSettings, caplog: pytest.LogCaptureFixture, study_first: bool
) -> None:
    s = settings.model_copy(update={"drafts": settings.drafts.model_copy(update={"stable_seconds": 0.0})})
    db = StateDB(s.paths.state)
    reader = DraftReader(s, db)
    if study_first:
        record_study(db, UID, "ACC-LOG-1")
    (s.paths.drafts / "ACC-LOG-1.txt").write_text("No pneumothorax.", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        reader.poll(0.0)
        reader.poll(1.0)
        if not study_first:
            record_study(db, UID, "ACC-LOG-1")
        pair_drafts(db, 2.0, 3600)
    fields = study_fields(caplog)
    assert fields["draft.paired"] == study_ref(UID)
    # Accepted before its study arrived: no study reference yet (never the accession's hash).
    assert fields["draft.accepted"] == (study_ref(UID) if study_first else None)
    assert study_ref("ACC-LOG-1") not in caplog.text
    db.close()
