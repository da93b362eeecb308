"""Deterministic UIDs: same audit, same UIDs; any content change, new UIDs."""

from __future__ import annotations

import re
from pathlib import Path

from dicom_agent.outputs.uids import derive_uid, instance_uid, result_digest, series_uid
from tests.support.studies import findings_result, make_study, no_finding_result

_UID = re.compile(r"^2\.25\.[1-9][0-9]*$")


class TestUIDs:
    def test_format_is_a_valid_2_25_uid(self) -> None:
        for n in range(200):
            uid = derive_uid("x", str(n))
            assert _UID.match(uid)
            assert len(uid) <= 64

    def test_same_result_same_uids_even_with_other_timings(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        result = findings_result(study)
        rerun = result.model_copy(update={"timings": {"model_ms": 1.0}, "outputs": {"sr": "1.2"}})
        assert result_digest(result) == result_digest(rerun)
        assert instance_uid(result, "sr") == instance_uid(rerun, "sr")

    def test_version_content_and_kind_change_the_uid(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        base = findings_result(study)
        uids = {
            instance_uid(base, "sr"),
            instance_uid(base, "gsps:0"),
            instance_uid(findings_result(study, version=2), "sr"),
            instance_uid(no_finding_result(study), "sr"),
            instance_uid(base.model_copy(update={"comparator_version": "comparator-2"}), "sr"),
        }
        assert len(uids) == 5

    def test_series_uid_is_stable_per_study_and_kind(self) -> None:
        assert series_uid("1.2.3", "sr") == series_uid("1.2.3", "sr")
        assert len({series_uid("1.2.3", "sr"), series_uid("1.2.3", "sc"), series_uid("1.2.4", "sr")}) == 3
