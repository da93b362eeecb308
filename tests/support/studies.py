"""Synthetic audited studies for the output tests: stored sources, display pictures, results.

The AuditResult is built directly from the schema models (the pipeline is tested elsewhere), with
boxes given in source pixels and mapped to the model's letterboxed input through ``Geometry``,
the way the pipeline does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from cxr_auditor.geometry import Geometry
from cxr_auditor.labels import Label
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    ImageRef,
    Inputs,
    ModelInfo,
    PixelBox,
    StudyKeys,
)
from dicom_agent.config import AgentSettings
from dicom_agent.outputs.layout import objects_to_send
from dicom_agent.outputs.writer import write_outputs
from dicom_agent.pixels import DisplayImage, to_display
from tests.support.builders import make_cxr, save

MODEL_INPUT = 896


@dataclass
class Study:
    datasets: dict[int, Dataset]
    sources: dict[int, Path]
    display: dict[int, DisplayImage]
    study_dir: Path

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def make_study(tmp_path: Path, *, images: int = 1, **cxr: Any) -> Study:
    """``images`` chest radiographs of one study saved under ``tmp_path/spool``."""
    first = make_cxr(**cxr)
    datasets = {0: first}
    for i in range(1, images):
        datasets[i] = make_cxr(
            study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, seed=i, **cxr
        )
    sources = {i: save(ds, tmp_path / "spool" / f"{i}.dcm") for i, ds in datasets.items()}
    display = {i: to_display(ds) for i, ds in datasets.items()}
    return Study(datasets, sources, display, tmp_path / "out" / str(first.StudyInstanceUID))


def image_refs(study: Study) -> list[ImageRef]:
    return [
        ImageRef(
            index=i,
            image_id=str(ds.SOPInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            view_position=str(ds.get("ViewPosition", "")) or None,
            width=int(ds.Columns),
            height=int(ds.Rows),
        )
        for i, ds in study.datasets.items()
    ]


def finding(
    study: Study, label: Label, pixels: tuple[float, float, float, float] | None, **kw: Any
) -> ImageFinding:
    """A finding whose box is given in source pixels (x0, y0, x1, y1) on image 0."""
    index = kw.pop("image_index", 0)
    ds = study.datasets[index]
    if pixels is None:
        return ImageFinding(label=label, image_index=index, **kw)
    geometry = Geometry.letterbox(int(ds.Columns), int(ds.Rows), MODEL_INPUT)
    box = geometry.from_source(PixelBox(x0=pixels[0], y0=pixels[1], x1=pixels[2], y1=pixels[3]))
    return ImageFinding(
        label=label, image_index=index, box=box, pixel_box=geometry.to_source(box), **kw
    )


MODELS = [
    ModelInfo(
        profile="cxr-auditor-v2",
        task="grounding",
        backend="fake",
        model_id="local/tiny-medgemma",
        revision="0123abc",
        prompt_hash="sha256:feedface",
    ),
    ModelInfo(profile="rules", task="draft_parsing", backend="rules"),
]

DRAFT = "Small left pleural effusion. No pneumothorax. Heart size normal."


def draft_finding(label: Label, status: DraftStatus, span: str) -> DraftFinding:
    start = DRAFT.index(span)
    return DraftFinding(label=label, status=status, span=span, start=start, end=start + len(span))


def result_for(
    study: Study,
    findings: list[ImageFinding],
    flags: list[Flag],
    *,
    draft: list[DraftFinding] | None = None,
    version: int = 1,
    mode: AuditMode = AuditMode.FULL,
) -> AuditResult:
    return AuditResult(
        study=StudyKeys(study_instance_uid=study.study_uid, accession_number="ACC0001"),
        result_version=version,
        inputs=Inputs(images=image_refs(study), draft_file="draft.txt", draft_sha256="0" * 64),
        models=MODELS,
        grounding=GroundingResult(state=GroundingState.OK, findings=findings),
        draft=DraftResult(state=DraftState.PARSED, parser="rules", findings=draft or []),
        mode=mode,
        comparator_version="comparator-1",
        flags=flags,
        timings={"model_ms": 12.5},
    )


def findings_result(study: Study, version: int = 1) -> AuditResult:
    """Effusion (in the draft), a missed urgent pneumothorax and an unlocalised nodule."""
    return result_for(
        study,
        [
            finding(study, Label.PLEURAL_EFFUSION, (300.0, 330.0, 460.0, 470.0), confidence=0.91),
            finding(study, Label.PNEUMOTHORAX, (60.0, 70.0, 200.0, 190.0), confidence=0.8),
            finding(study, Label.NODULE_MASS, None),
        ],
        [
            Flag(kind=FlagKind.MISSING, label=Label.PNEUMOTHORAX, rationale="r", denied=True),
            Flag(kind=FlagKind.URGENT, label=Label.PNEUMOTHORAX, rationale="r", missed=True),
            Flag(kind=FlagKind.MISSING, label=Label.NODULE_MASS, rationale="r"),
            Flag(kind=FlagKind.URGENT, label=Label.NODULE_MASS, rationale="r", missed=True),
        ],
        draft=[
            draft_finding(Label.PLEURAL_EFFUSION, DraftStatus.PRESENT, "Small left pleural effusion"),
            draft_finding(Label.PNEUMOTHORAX, DraftStatus.ABSENT, "No pneumothorax"),
        ],
        version=version,
    )


def no_finding_result(study: Study) -> AuditResult:
    return result_for(
        study,
        [finding(study, Label.NO_FINDING, None, confidence=0.97)],
        [],
        draft=[draft_finding(Label.CARDIOMEGALY, DraftStatus.ABSENT, "Heart size normal")],
    )


def unsupported_result(study: Study) -> AuditResult:
    span = "Small left pleural effusion"
    start = DRAFT.index(span)
    return result_for(
        study,
        [finding(study, Label.CARDIOMEGALY, (180.0, 250.0, 360.0, 400.0), confidence=0.66)],
        [
            Flag(
                kind=FlagKind.UNSUPPORTED,
                label=Label.PLEURAL_EFFUSION,
                rationale="asserted by the draft, not seen by the image model",
                span=span,
                start=start,
                end=start + len(span),
            ),
            Flag(kind=FlagKind.MISSING, label=Label.CARDIOMEGALY, rationale="r"),
        ],
        draft=[draft_finding(Label.PLEURAL_EFFUSION, DraftStatus.PRESENT, span)],
    )


def failed_result(study: Study) -> AuditResult:
    """Grounding failed: no findings, no flags, and nothing may read as a normal study."""
    return result_for(study, [], [], mode=AuditMode.NO_FLAGS).model_copy(
        update={"grounding": GroundingResult(state=GroundingState.FAILED, raw_text="{{{")}
    )


def written_findings(
    tmp_path: Path, settings: AgentSettings
) -> tuple[Study, AuditResult, list[Path]]:
    """A findings study with every output written: the study, the final result and the
    DICOM objects that would be sent to a destination."""
    study = make_study(tmp_path)
    result = write_outputs(
        findings_result(study),
        sources=study.sources,
        display=study.display,
        study_dir=study.study_dir,
        settings=settings,
    )
    return study, result, objects_to_send(study.study_dir, result)
