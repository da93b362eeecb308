"""Study preparation: files given to ``cxr-agent audit`` are prepared as ``serve`` prepares the
same files once stored (issue 15: the two paths disagreed on lateral views and study keys)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_auditor.schema import StudyKeys
from dicom_agent import spool
from dicom_agent.config import AgentSettings
from dicom_agent.errors import AgentError
from dicom_agent.prepare import Draft, instances_from_files, prepare_study
from dicom_agent.state import StateDB
from tests.support.builders import make_cxr, save

UID = "1.2.826.0.1.88"


def test_files_and_stored_instances_prepare_alike(settings: AgentSettings) -> None:
    datasets = [
        make_cxr(rows=96, cols=80, study_uid=UID, accession="ACC-88"),
        make_cxr(rows=96, cols=80, study_uid=UID, accession="ACC-88", view_position="LL"),
        make_cxr(rows=90, cols=70, study_uid=UID, accession="ACC-88", modality="CR",
                 view_position="", body_part="CHEST", seed=1),
    ]
    paths = [save(ds, settings.paths.spool / UID / f"{ds.SOPInstanceUID}.dcm") for ds in datasets]
    db = StateDB(settings.paths.state)
    try:
        assert spool.reconcile(db, settings.paths.spool) == 3  # recorded as the listener would
        stored = prepare_study(
            sorted(db.instances_of_study(UID), key=lambda r: paths.index(Path(r.path))),
            settings,
            study=StudyKeys(study_instance_uid=UID, accession_number=db.study(UID).accession_number),  # type: ignore[union-attr]
            draft=Draft("No pneumothorax."),
        )
    finally:
        db.close()
    rows, pictures, keys = instances_from_files(paths)
    files = prepare_study(rows, settings, study=keys, draft=Draft("No pneumothorax."))

    assert pictures == []
    assert keys == stored.item.study == StudyKeys(study_instance_uid=UID, accession_number="ACC-88")
    assert files.profile == stored.profile == settings.grounding.profile
    assert files.item.inputs() == stored.item.inputs()
    assert [r.image_id for r in files.item.image_refs] == [
        str(datasets[0].SOPInstanceUID), str(datasets[2].SOPInstanceUID)
    ]
    assert files.item.skipped_images == [
        {"image_id": str(datasets[1].SOPInstanceUID), "reason": "lateral_view"}
    ]
    for a, b in zip(files.item.images, stored.item.images, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.patient_left_on_image_right == b.patient_left_on_image_right


def test_a_picture_follows_the_routed_images_and_has_no_side(
    settings: AgentSettings, tmp_path: Path
) -> None:
    from PIL import Image

    dicom = save(make_cxr(rows=64, cols=64, study_uid=UID), tmp_path / "a.dcm")
    picture = tmp_path / "b.png"
    Image.new("L", (40, 30), 200).save(picture)
    rows, pictures, _ = instances_from_files([picture, dicom])
    assert pictures == [picture] and [Path(r.path) for r in rows] == [dicom]
    prepared = prepare_study(rows, settings, study=StudyKeys(), pictures=pictures)
    assert [r.image_id for r in prepared.item.image_refs][1] == "b.png"
    assert prepared.item.images[1].patient_left_on_image_right is None
    assert (prepared.item.image_refs[1].width, prepared.item.image_refs[1].height) == (40, 30)
    assert set(prepared.sources) == {0}  # only a stored DICOM file is a source for the outputs


def test_a_file_that_is_no_picture_is_refused(settings: AgentSettings, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 300)
    rows, pictures, _ = instances_from_files([junk])
    with pytest.raises(AgentError, match="neither DICOM nor a readable picture"):
        prepare_study(rows, settings, study=StudyKeys(), pictures=pictures)
