"""Monitoring against signed final reports (dicom_agent.finals): the finals folder, the
agreement rows, the running window and its gauges, with audits run through the real pipeline
(fake grounder answers, rules draft parser)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from cxr_auditor.drafts import get_parser
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.fake import BRIGHT_ANSWER, DARK_ANSWER, FakeGrounder
from cxr_auditor.pipeline import AuditItem, Auditor
from cxr_auditor.schema import AuditResult, ImageRef, ModelInfo, StudyKeys
from dicom_agent.config import AgentSettings
from dicom_agent.finals import Monitor, agreement_rows, window_summary
from dicom_agent.observe import Metrics
from dicom_agent.outputs.sidecar import write_sidecar
from dicom_agent.state import AgreementRow, FinalState, StateDB

UID = "1.2.826.0.1.3680043.8.498.1"
ACCESSION = "ACC001"
PARSER = get_parser("rules")


def _audit(answer: str, draft: str | None, profile: str = "fake") -> AuditResult:
    info = ModelInfo(profile=profile, task="grounding", backend="fake")
    auditor = Auditor(FakeGrounder(answer, info), PARSER)
    return auditor.audit(
        AuditItem(
            images=[ImageInput(Image.new("RGB", (64, 64)), 0, Geometry.identity(64, 64), True)],
            image_refs=[ImageRef(index=0, image_id="i", width=64, height=64)],
            draft_text=draft,
            study=StudyKeys(study_instance_uid=UID),
        )
    )


def _rows(result: AuditResult, final_text: str) -> dict[str, AgreementRow]:
    (final,) = PARSER.parse_many([final_text])
    rows = agreement_rows(result, final, final_id=1, study_uid=UID, now=1.0)
    return {r.label: r for r in rows}


class TestAgreementRows:
    def test_model_draft_and_flags_against_the_final(self) -> None:
        # model: pneumothorax + effusion; draft: effusion only, pneumothorax denied
        result = _audit(BRIGHT_ANSWER, "Small right pleural effusion. No pneumothorax.")
        rows = _rows(result, "Left pneumothorax. No pleural effusion.")
        ptx, eff, cardio = rows["pneumothorax"], rows["pleural_effusion"], rows["cardiomegaly"]
        assert (ptx.final_present, ptx.model_present, ptx.draft_present) == (True, True, False)
        assert set(ptx.flags) == {"missing", "urgent"}
        assert (eff.final_present, eff.model_present, eff.draft_present) == (False, True, True)
        # not mentioned in the final: negative; nobody said it
        assert (cardio.final_present, cardio.model_present, cardio.draft_present) == (
            False, False, False)
        assert all(r.profile == "fake" and r.result_version == 1 for r in rows.values())

    def test_uncertain_final_records_nothing_for_that_label(self) -> None:
        rows = _rows(_audit(DARK_ANSWER, None), "Possible small pneumothorax.")
        assert "pneumothorax" not in rows and len(rows) == 4

    def test_no_draft_and_failed_grounding_are_none(self) -> None:
        rows = _rows(_audit("garbage", None), "Cardiomegaly.")
        assert rows["cardiomegaly"].model_present is None
        assert rows["cardiomegaly"].draft_present is None


def _row(label: str, final: bool, model: bool | None, draft: bool | None = None,
         flags: tuple[str, ...] = (), profile: str = "p") -> AgreementRow:
    return AgreementRow(final_id=1, study_instance_uid=UID, result_version=1, profile=profile,
                        label=label, final_present=final, model_present=model,
                        draft_present=draft, flags=flags, recorded_at=0.0)


def test_window_summary_known_figures() -> None:
    rows = [
        _row("pneumothorax", True, True, False, ("missing", "urgent")),
        _row("pneumothorax", True, False, True, ("unsupported",)),  # the final says it is there
        _row("pneumothorax", False, True, None, ("unsupported",)),
        _row("pneumothorax", False, False, False),
        _row("pneumothorax", False, None, False),
        _row("pneumothorax", True, True, profile="q"),
    ]
    body = window_summary(rows, 200).as_dict()
    p = next(x for x in body["labels"] if x["profile"] == "p")
    assert p["cases"] == 5
    assert p["model_sensitivity"]["successes"] == 1 and p["model_sensitivity"]["n"] == 2
    assert p["model_specificity"]["successes"] == 1 and p["model_specificity"]["n"] == 2
    assert p["draft_sensitivity"]["value"] == 0.5 and p["draft_specificity"]["value"] == 1.0
    flags = {(f["profile"], f["kind"]): f["confirmed"] for f in body["flags"]}
    assert flags[("p", "missing")]["value"] == 1.0
    # an unsupported flag is confirmed by a negative final only: one of two
    assert flags[("p", "unsupported")]["value"] == 0.5


def _monitor(settings: AgentSettings) -> tuple[Monitor, StateDB, Metrics]:
    db = StateDB(settings.paths.state)
    metrics = Metrics()
    return Monitor(settings, db, metrics, parser=PARSER), db, metrics


def _drop(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def _study(db: StateDB, uid: str = UID, accession: str = ACCESSION, now: float = 1.0) -> None:
    """One stored chest instance of study ``uid``."""
    db.record_instance(
        sop_instance_uid=uid + ".1", study_instance_uid=uid, series_instance_uid=uid + ".2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", modality="CR", transfer_syntax_uid=None,
        view_position="PA", body_part="CHEST", accession_number=accession, path=uid,
        sha256="0" * 64, size=1, now=now,
    )


def test_final_waits_for_its_audit_then_is_compared(settings: AgentSettings) -> None:
    monitor, db, metrics = _monitor(settings)
    _study(db)
    _drop(settings.paths.finals, f"{ACCESSION}.txt", "Left pneumothorax.")
    monitor.tick(now=10.0)  # first poll: seen
    assert monitor.tick(now=20.0) == 0  # read, but the study has no result yet
    (final,) = db.finals()
    assert final.state == FinalState.PENDING.value
    assert (settings.paths.finals / "processed" / f"{ACCESSION}.txt").exists()

    write_sidecar(settings.paths.out / UID, _audit(BRIGHT_ANSWER, "No pneumothorax."))
    assert monitor.tick(now=30.0) == 1
    assert db.finals()[0].state == FinalState.COMPARED.value
    window = {r.label: r for r in db.agreement_window(10)}
    assert window["pneumothorax"].final_present and window["pneumothorax"].model_present
    text = metrics.render().decode()
    assert 'cxr_agent_monitor_sensitivity{label="pneumothorax",profile="fake",source="model"} 1.0' in text
    assert 'cxr_agent_monitor_sensitivity{label="pneumothorax",profile="fake",source="draft"} 0.0' in text
    # missing pneumothorax confirmed, missing effusion not (the final does not name it)
    assert 'cxr_agent_monitor_flag_confirmed_ratio{kind="missing",profile="fake"} 0.5' in text
    assert 'cxr_agent_monitor_flag_confirmed_ratio{kind="urgent",profile="fake"} 1.0' in text
    assert 'cxr_agent_finals_total{outcome="accepted"} 1.0' in text


def test_amended_final_replaces_the_study_rows(settings: AgentSettings) -> None:
    monitor, db, _ = _monitor(settings)
    _study(db)
    write_sidecar(settings.paths.out / UID, _audit(BRIGHT_ANSWER, None))
    for n, text in enumerate(["Left pneumothorax.", "No pneumothorax."]):
        _drop(settings.paths.finals, f"{UID}.txt", text)
        monitor.tick(now=100.0 * n)
        assert monitor.tick(now=100.0 * n + 10) == 1
    states = [f.state for f in db.finals()]
    assert states == [FinalState.SUPERSEDED.value, FinalState.COMPARED.value]
    rows = db.agreement_window(10)
    assert len(rows) == 5 and {r.final_id for r in rows} == {2}
    assert not next(r for r in rows if r.label == "pneumothorax").final_present


def test_identical_final_is_a_duplicate_and_bad_one_rejected(
    settings: AgentSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_agent")
    monitor, db, metrics = _monitor(settings)
    for name, text in [(f"{ACCESSION}.txt", "Cardiomegaly."), ("bad name!.txt", "x")]:
        _drop(settings.paths.finals, name, text)
    monitor.tick(now=0.0)
    monitor.tick(now=10.0)
    _drop(settings.paths.finals, f"{ACCESSION}.txt", "Cardiomegaly.")
    monitor.tick(now=20.0)
    monitor.tick(now=30.0)
    assert len(db.finals()) == 1
    assert (settings.paths.finals / "rejected").is_dir()
    text = metrics.render().decode()
    assert 'cxr_agent_finals_total{outcome="duplicate"} 1.0' in text
    assert 'cxr_agent_finals_total{outcome="rejected_bad_name"} 1.0' in text
    events = {getattr(r, "event", None) for r in caplog.records}
    assert "final.rejected" in events and "draft.rejected" not in events


def test_accession_held_by_two_studies_is_not_compared(settings: AgentSettings) -> None:
    monitor, db, _ = _monitor(settings)
    _study(db)
    _study(db, UID + "9", ACCESSION, now=2.0)
    write_sidecar(settings.paths.out / UID, _audit(BRIGHT_ANSWER, None))
    _drop(settings.paths.finals, f"{ACCESSION}.txt", "Cardiomegaly.")
    monitor.tick(now=0.0)
    assert monitor.tick(now=10.0) == 0
    assert db.finals()[0].state == FinalState.PENDING.value


@pytest.mark.parametrize("window", [1, 3])
def test_window_keeps_the_newest_rows_per_profile_and_label(
    settings: AgentSettings, window: int
) -> None:
    db = StateDB(settings.paths.state)
    for n in range(4):
        uid = f"{UID}.{n}"
        db.record_agreements(n + 1, uid, [
            AgreementRow(final_id=n + 1, study_instance_uid=uid, result_version=1, profile="p",
                         label="pneumothorax", final_present=n % 2 == 0, model_present=True,
                         draft_present=None, flags=(), recorded_at=float(n))
        ], now=float(n))
    rows = db.agreement_window(window)
    assert [r.final_id for r in rows] == list(range(5 - window, 5))
    assert json.dumps(window_summary(rows, window).as_dict())  # JSON-ready


def _sr_file(path: Path, study_uid: str, texts: list[str], modality: str = "SR") -> None:
    """A Basic Text SR (PS3.3 A.35.1) whose content tree holds ``texts`` in a container."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def item(**kw: object) -> Dataset:
        ds = Dataset()
        for key, value in kw.items():
            setattr(ds, key, value)
        return ds

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.ValueType = "CONTAINER"
    ds.ContentSequence = [
        item(RelationshipType="CONTAINS", ValueType="CONTAINER", ContinuityOfContent="SEPARATE",
             ContentSequence=[item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue=t)
                              for t in texts]),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_final_exported_as_an_sr_file(settings: AgentSettings) -> None:
    monitor, db, metrics = _monitor(settings)
    _study(db)
    write_sidecar(settings.paths.out / UID, _audit(BRIGHT_ANSWER, None))
    _sr_file(settings.paths.finals / "report.dcm", UID, ["FINDINGS: Left pneumothorax.",
                                                         "IMPRESSION: Pneumothorax."])
    _sr_file(settings.paths.finals / "image.dcm", UID, ["x"], modality="DX")
    monitor.tick(now=0.0)
    assert monitor.tick(now=10.0) == 1
    (final,) = db.finals()
    assert final.key == UID and final.text.startswith("FINDINGS: Left pneumothorax.\nIMPRESSION")
    ptx = next(r for r in db.agreement_window(5) if r.label == "pneumothorax")
    assert ptx.final_present and ptx.model_present
    assert 'cxr_agent_finals_total{outcome="rejected_unsupported_type"} 1.0' in metrics.render().decode()


def test_unreadable_result_leaves_its_final_pending_and_others_go_on(settings: AgentSettings) -> None:
    monitor, db, _ = _monitor(settings)
    _study(db)
    other = UID + "7"
    _study(db, other, "ACC002", now=2.0)
    (settings.paths.out / UID).mkdir(parents=True)
    (settings.paths.out / UID / "audit.json").write_text("{not json")
    write_sidecar(settings.paths.out / other, _audit(BRIGHT_ANSWER, None))
    _drop(settings.paths.finals, f"{ACCESSION}.txt", "Cardiomegaly.")
    _drop(settings.paths.finals, "ACC002.txt", "Cardiomegaly.")
    monitor.tick(now=0.0)
    assert monitor.tick(now=10.0) == 1
    assert sorted(f.state for f in db.finals()) == [FinalState.COMPARED.value,
                                                     FinalState.PENDING.value]


def test_monitoring_command_prints_the_window(settings: AgentSettings, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from dicom_agent.cli import app

    monitor, db, _ = _monitor(settings)
    _study(db)
    write_sidecar(settings.paths.out / UID, _audit(BRIGHT_ANSWER, "No pneumothorax."))
    _drop(settings.paths.finals, f"{ACCESSION}.txt", "Left pneumothorax.")
    monitor.tick(now=0.0)
    monitor.tick(now=10.0)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"paths": {"state": str(settings.paths.state)}}))
    result = CliRunner().invoke(app, ["monitoring", "--config", str(config)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    ptx = next(r for r in body["labels"] if r["label"] == "pneumothorax")
    assert ptx["model_sensitivity"]["value"] == 1.0 and ptx["draft_sensitivity"]["value"] == 0.0
    assert body["finals"]["compared"] == 1
    assert "1.000 [0.21-1.00] n=1" in result.stderr and "Research use only" in result.stderr
