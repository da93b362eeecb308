"""A web app over real agent parts: state DB, metrics, model registry, and a worker that writes
real outputs with the deterministic fake grounder and the rule-based draft parser."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from cxr_auditor.drafts import get_parser
from cxr_auditor.grounding.fake import FakeGrounder
from cxr_auditor.pipeline import Auditor
from dicom_agent.config import AgentSettings
from dicom_agent.observe import Metrics
from dicom_agent.registry import Models
from dicom_agent.scheduler import Reason, queue_audit
from dicom_agent.scp import Listener
from dicom_agent.state import StateDB, StudyState
from dicom_agent.web import create_app
from dicom_agent.worker import Worker
from tests.support.builders import make_cxr, save

#: The draft of the audited study: the effusion is in it, the pneumothorax is not.
DRAFT = "Small right pleural effusion. No consolidation."


class WebAgent:
    """What :class:`dicom_agent.web.context.AgentView` needs, over real parts (no listener)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.db = StateDB(settings.paths.state)
        self.metrics = Metrics()
        grounder = FakeGrounder.from_rule("mean_brightness")
        self.models = Models(lambda name: Auditor(grounder, get_parser("rules")), 60, self.metrics)
        self.listener: Listener | None = None
        self.serving = True
        self.worker = Worker(settings, self.db, self.models, self.metrics)

    def snapshot(self) -> dict[str, Any]:
        profile = self.settings.grounding.profile
        return {
            "serving": self.serving,
            "listener": {"running": self.serving, "port": self.settings.scp.port},
            "model": self.models.status().get(profile, {"profile": profile, "state": "not_loaded"}),
        }

    def store(self, study_uid: str, accession: str, *, now: float | None = None,
              **kw: Any) -> str:
        """Store one radiograph of ``study_uid`` as the listener would record it."""
        ds = make_cxr(rows=128, cols=112, study_uid=study_uid, accession=accession, **kw)
        path = save(ds, self.settings.paths.spool / study_uid / f"{ds.SOPInstanceUID}.dcm")
        self.db.record_instance(
            sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study_uid,
            series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
            modality=ds.Modality, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            view_position=ds.ViewPosition, body_part=ds.BodyPartExamined,
            accession_number=ds.AccessionNumber, path=str(path), sha256=ds.SOPInstanceUID,
            size=path.stat().st_size, now=time.time() if now is None else now,
        )
        return str(ds.SOPInstanceUID)

    def audit(self, study_uid: str, accession: str, draft: str | None) -> None:
        """Pair ``draft`` (if any) and run the study's audit through the real worker."""
        now = time.time()
        draft_id = None
        if draft is not None:
            _, draft_id = self.db.record_draft(
                key=accession, key_kind="accession", file_name=f"{accession}.txt",
                sha256=str(hash(draft)), text=draft, author=None, now=now)
            self.db.pair_draft(draft_id, study_uid, now)
        self.db.set_study_state(study_uid, StudyState.WAITING_DRAFT, now, settled_at=now)
        queue_audit(self.db, study_uid, draft_id, Reason.DRAFT, now)
        assert self.worker.run_once() == 1


@pytest.fixture
def web_agent(settings: AgentSettings) -> Iterator[WebAgent]:
    settings.web.uploads = settings.paths.spool.parent / "uploads"
    settings.grounding.profile = "fake"  # the name the fake grounder reports in its results
    agent = WebAgent(settings)
    yield agent
    agent.models.close()
    agent.db.close()


@pytest.fixture
def client(web_agent: WebAgent) -> Iterator[TestClient]:
    with TestClient(create_app(web_agent), base_url="http://127.0.0.1:8080") as c:
        yield c


STUDY = "1.2.826.0.1.3680043.8.498.7001"
ACCESSION = "ACC7001"


@pytest.fixture
def audited(web_agent: WebAgent) -> str:
    """One study audited with :data:`DRAFT` (the bright phantom: pneumothorax + effusion)."""
    web_agent.store(STUDY, ACCESSION)
    web_agent.audit(STUDY, ACCESSION, DRAFT)
    return STUDY
