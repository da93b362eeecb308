"""The pages over a real audited study: list, study page, actions, queue (Starlette TestClient)."""

from __future__ import annotations

import re
import time

import pytest
from starlette.testclient import TestClient

from dicom_agent.config import AgentSettings
from dicom_agent.state import DraftState, JobKind, JobState, StudyState
from tests.dicom_agent.web.conftest import ACCESSION, DRAFT, STUDY, WebAgent

BANNER = "RESEARCH USE ONLY"


def rows(html: str, table_id: str) -> list[str]:
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)[1:]  # without the header


class TestStudiesList:
    def test_lists_the_study_with_urgent_first_and_its_profile(
        self, client: TestClient, audited: str
    ) -> None:
        html = client.get("/studies").text
        assert BANNER in html
        (row,) = rows(html, "studies")
        assert ACCESSION in row and "audited" in row and "fake" in row
        badges = re.findall(r'class="badge flag-(\w+)"', row)
        assert badges == ["urgent", "missing"]  # the pneumothorax the draft left out, URGENT first

    def test_state_filter_and_prefix_search(self, client: TestClient, web_agent: WebAgent) -> None:
        web_agent.store("1.2.3.10", "ABC-1")
        web_agent.store("1.2.3.20", "XYZ-2")
        web_agent.db.set_study_state("1.2.3.20", StudyState.WAITING_DRAFT, time.time())
        assert [ACC for ACC in ("ABC-1", "XYZ-2") if ACC in client.get("/studies").text] == [
            "ABC-1", "XYZ-2"]
        waiting = client.get("/studies", params={"state": "waiting_draft"}).text
        assert "XYZ-2" in waiting and "ABC-1" not in waiting
        by_accession = client.get("/studies", params={"q": "ABC"}).text
        assert "ABC-1" in by_accession and "XYZ-2" not in by_accession
        by_uid = client.get("/studies", params={"q": "1.2.3.2"}).text
        assert "XYZ-2" in by_uid and "ABC-1" not in by_uid
        assert "no studies match" in client.get("/studies", params={"q": "9.9"}).text

    def test_flag_and_profile_filters_use_the_latest_result(
        self, client: TestClient, web_agent: WebAgent
    ) -> None:
        web_agent.store("1.2.6.1", "FLAGGED")  # bright: the fake finds a pneumothorax
        web_agent.audit("1.2.6.1", "FLAGGED", "Small right pleural effusion.")
        web_agent.store("1.2.6.2", "CLEAN", window=(3000.0, 1000.0))  # dark: no finding
        web_agent.audit("1.2.6.2", "CLEAN", "No acute abnormality.")
        web_agent.store("1.2.6.3", "NOT-YET")  # never audited

        def listed(**params: str) -> list[str]:
            html = client.get("/studies", params=params).text
            return re.findall(r'class="study-link" href="[^"]+">([^<]+)<', html)

        assert listed(flag="urgent") == ["FLAGGED"]
        assert listed(flag="unsupported") == []
        assert listed(profile="fake") == ["CLEAN", "FLAGGED"]  # newest first
        assert listed(profile="fake", flag="missing") == ["FLAGGED"]
        assert listed(profile="other") == []
        assert listed() == ["NOT-YET", "CLEAN", "FLAGGED"]
        assert 'option value="fake"' in client.get("/studies").text
        # a re-audit whose draft now reports the pneumothorax: no longer MISSING (still URGENT)
        web_agent.audit("1.2.6.1", "FLAGGED", "Right pleural effusion. Left pneumothorax.")
        assert listed(flag="missing") == [] and listed(flag="urgent") == ["FLAGGED"]
        # an older version arriving late does not overwrite the newer brief
        web_agent.db.record_result("1.2.6.1", 1, "fake", ["missing"], time.time())
        assert listed(flag="missing") == []

    def test_keyset_pages_cover_every_study_once(
        self, client: TestClient, web_agent: WebAgent, settings: AgentSettings
    ) -> None:
        settings.web.page_size = 4
        for i in range(10):
            web_agent.store(f"1.2.5.{i}", f"P{i:02d}", now=1000.0 + i)
        seen: list[str] = []
        url = "/studies"
        while url:
            html = client.get(url).text
            seen += re.findall(r">(P\d\d)</a>", html)
            match = re.search(r'id="next-page" href="([^"]+)"', html)
            url = match.group(1).replace("&amp;", "&") if match else ""
        assert seen == [f"P{i:02d}" for i in reversed(range(10))]

    def test_orphan_drafts_are_a_choice_of_the_filter(
        self, client: TestClient, web_agent: WebAgent
    ) -> None:
        _, draft_id = web_agent.db.record_draft(key="LOST-1", key_kind="accession",
                                                file_name="LOST-1.txt", sha256="x", text="t",
                                                author=None, now=time.time())
        web_agent.db.set_draft_state(draft_id, DraftState.ORPHAN, time.time())
        (row,) = rows(client.get("/studies", params={"state": "orphan_drafts"}).text, "orphans")
        assert "LOST-1" in row


class TestStudyPage:
    def test_overlay_legend_draft_spans_flags_timeline_and_files(
        self, client: TestClient, audited: str
    ) -> None:
        html = client.get(f"/studies/{STUDY}").text
        assert BANNER in html and STUDY in html
        assert "missing in draft" in html and "urgent" in html  # the legend
        (overlay,) = re.findall(r'<img class="overlay" src="([^"]+)"', html)
        picture = client.get(overlay)
        assert picture.headers["content-type"] == "image/png" and picture.content[:4] == b"\x89PNG"
        marks = re.findall(r'<mark class="span span-(\w+)" title="([^"]+)">([^<]+)<', html)
        assert ("present", "pleural_effusion (present)", "Small right pleural effusion") in marks
        assert ("absent", "lung_opacity_consolidation (absent)", "No consolidation") in marks
        assert DRAFT.split(".")[0] in html  # the text itself, verbatim
        flag_rows = rows(html, "flags")
        assert "URGENT" in flag_rows[0] and "pneumothorax" in flag_rows[0]
        timeline = " ".join(rows(html, "timeline"))
        assert "first instance received" in timeline and "audit job 1 done" in timeline
        timings = html.split('id="timings"', 1)[1].split("</table>", 1)[0]
        assert "<th>decode</th>" in timings and "<th>model</th>" in timings  # unit in the cell
        links = dict(re.findall(r'<a href="(/studies/[^"]+/files/[^"]+)">([^<]+)</a>', html))
        assert any(label == "audit.json" for label in links.values())
        sr = next(href for href, label in links.items() if label.startswith("sr "))
        response = client.get(sr)
        assert response.headers["content-type"] == "application/dicom"
        assert response.content[128:132] == b"DICM"

    def test_every_version_is_listed_and_can_be_shown(
        self, client: TestClient, web_agent: WebAgent, audited: str
    ) -> None:
        web_agent.audit(STUDY, ACCESSION, "No pleural effusion. Left pneumothorax.")
        html = client.get(f"/studies/{STUDY}").text
        assert re.findall(r'href="\?v=(\d+)"', html) == ["2", "1"]
        assert "Left pneumothorax" in html
        old = client.get(f"/studies/{STUDY}", params={"v": 1}).text
        assert "Small right pleural effusion" in old

    def test_patient_identity_only_when_enabled(
        self, client: TestClient, settings: AgentSettings, audited: str
    ) -> None:
        from tests.support.builders import SENTINEL_PATIENT_NAME

        assert SENTINEL_PATIENT_NAME not in client.get(f"/studies/{STUDY}").text
        settings.web.show_patient_identity = True
        assert SENTINEL_PATIENT_NAME in client.get(f"/studies/{STUDY}").text

    @pytest.mark.parametrize("name", ["../../state/agent.sqlite3", "v1/../../../x.json", "v1/none.png"])
    def test_files_outside_the_study_folder_are_not_served(
        self, client: TestClient, audited: str, name: str
    ) -> None:
        assert client.get(f"/studies/{STUDY}/files/{name}").status_code == 404

    def test_unknown_and_malformed_study_uids_are_404(self, client: TestClient) -> None:
        assert client.get("/studies/1.2.3.999").status_code == 404
        assert client.get("/studies/not-a-uid").status_code == 404


class TestActions:
    def test_reaudit_queues_the_next_version(
        self, client: TestClient, web_agent: WebAgent, audited: str
    ) -> None:
        r = client.post(f"/studies/{STUDY}/reaudit")
        assert "queued audit job 2 (result version 2)" in r.text
        job = web_agent.db.latest_audit_job(STUDY)
        assert job is not None and job.state == JobState.QUEUED.value and job.result_version == 2

    def test_reaudit_after_the_images_expired_says_so(
        self, client: TestClient, web_agent: WebAgent, audited: str
    ) -> None:
        assert web_agent.db.take_expired_instances(STUDY, time.time() + 1)
        r = client.post(f"/studies/{STUDY}/reaudit")
        assert "images are gone" in r.text
        assert web_agent.db.latest_audit_job(STUDY).result_version == 1  # type: ignore[union-attr]

    def test_resend_without_a_research_destination_says_so(
        self, client: TestClient, audited: str
    ) -> None:
        r = client.post(f"/studies/{STUDY}/resend")
        assert "no destination with research: true" in r.text

    def test_resend_queues_the_validated_objects(
        self, client: TestClient, web_agent: WebAgent, settings: AgentSettings, audited: str
    ) -> None:
        from dicom_agent.config import Destination

        settings.forward.destinations = [
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, research=True)]
        r = client.post(f"/studies/{STUDY}/resend")
        assert "queued" in r.text and "for 1 destination(s)" in r.text
        assert [j.kind for j in web_agent.db.jobs_of_study(STUDY)].count(JobKind.FORWARD.value) == 1

    def test_retry_a_dead_audit_job(
        self, client: TestClient, web_agent: WebAgent, settings: AgentSettings, audited: str
    ) -> None:
        now = time.time()
        job = web_agent.db.queue_audit(STUDY, None, "reaudit", now)
        web_agent.db.transition_job(job.id, JobState.RUNNING, now)
        web_agent.db.transition_job(job.id, JobState.DEAD, now, error="model crashed\ntrace")
        html = client.get(f"/studies/{STUDY}").text
        assert f"Retry dead audit job {job.id}" in html
        queue_html = client.get("/queue").text
        (dead_row,) = rows(queue_html, "dead")
        assert "model crashed" in dead_row and "trace" not in dead_row
        r = client.post(f"/jobs/{job.id}/retry")
        assert "queued audit job" in r.text
        assert web_agent.db.latest_audit_job(STUDY).state == JobState.QUEUED.value  # type: ignore[union-attr]


class TestQueue:
    def test_depths_model_and_the_last_hour_chart(
        self, client: TestClient, web_agent: WebAgent
    ) -> None:
        from dicom_agent.web.queue import throughput_bars

        now = time.time()
        for i, (minutes_ago, target) in enumerate(
            [(2, JobState.DONE), (3, JobState.DONE), (4, JobState.DEAD), (32, JobState.DONE),
             (90, JobState.DONE)]  # the last one is outside the hour
        ):
            uid = f"1.2.7.{i}"
            web_agent.store(uid, f"Q{i}")
            at = now - minutes_ago * 60
            job = web_agent.db.queue_audit(uid, None, "draft", at)
            web_agent.db.transition_job(job.id, JobState.RUNNING, at)
            web_agent.db.transition_job(job.id, target, at, error="boom" if target is
                                        JobState.DEAD else None)
        bars, top = throughput_bars(web_agent.db, now)
        assert len(bars) == 12 and top == 3
        assert [(b.done, b.dead) for b in bars][-1] == (2, 1)  # the last 5 minutes
        assert sum(b.done for b in bars) == 3 and sum(b.dead for b in bars) == 1
        assert bars[-1].done_height == 80.0 and bars[-1].dead_height == 40.0  # of 120 for 3
        html = client.get("/queue").text
        assert "3 done, 1 dead" in html
        assert html.count('class="bar-done"') == 12
        assert ">done</th><td>4<" in html.replace("\n", "")  # depth: every done job
        (dead,) = rows(html, "dead")
        assert "boom" in dead
