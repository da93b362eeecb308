"""Tests of cxr_auditor.classification: verbose patency answers and the dsa-patency profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_auditor.classification import ClassificationResult, PatencyClassifier, interpret_patency
from cxr_auditor.errors import ProfileError
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.profiles import get_profile, parse_profile
from tests.support import tinymodels as tm
from tests.support.model_fixtures import ScriptedChat, tiny_profile


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("patent", "patent"),
        ("Blocked.", "blocked"),
        ("The vessel is not blocked.", "patent"),
        ("No occlusion is seen; the artery is patent.", "patent"),
        ("No evidence of occlusion.", "patent"),
        ("without obstruction", "patent"),
        ("The vessel is occluded.", "blocked"),
        ("Stenosis 100% of the distal segment.", "blocked"),
        ("100% stenosis", "blocked"),
        ("Total occlusion of the M1 segment.", "blocked"),
        ("The vessel is not patent.", "blocked"),
        ("<think>could it be blocked?</think>Patent.", "patent"),
        ("patent proximally but blocked distally", "uncertain"),
        ("Possibly occluded.", "uncertain"),
        ("Cannot exclude occlusion.", "uncertain"),
        ("The image quality is poor.", "uncertain"),
        ("", "uncertain"),
    ],
)
def test_interpret_patency(answer: str, label: str) -> None:
    assert interpret_patency(answer)[0] == label


def test_reason_codes_say_why_an_answer_is_uncertain() -> None:
    assert interpret_patency("patent and blocked")[1] == ["answer_contradictory"]
    assert interpret_patency("maybe")[1] == ["answer_without_label"]
    assert interpret_patency("probably patent")[1] == ["answer_hedged"]


def test_profile_terms_extend_the_vocabulary() -> None:
    assert interpret_patency("Vessel is perfused", {})[0] == "patent"
    assert interpret_patency("cut-off sign", {"cut-off": "blocked"})[0] == "blocked"
    assert interpret_patency("no cut-off", {"cut-off": "blocked"})[0] == "patent"


def _xa(value: int, index: int = 0) -> ImageInput:
    return ImageInput(tm.solid_image(value), index, Geometry.identity(64, 64))


class TestPatencyClassifier:
    def test_blocked_is_urgent_and_uncertain_needs_review(self) -> None:
        chat = ScriptedChat(["Blocked.", "It may be patent.", "patent"])
        results = PatencyClassifier(get_profile("dsa-patency"), chat).classify(
            [_xa(0, 0), _xa(0, 1), _xa(0, 2)]
        )
        assert [(r.label, r.urgent, r.needs_review) for r in results] == [
            ("blocked", True, False),
            ("uncertain", False, True),
            ("patent", False, False),
        ]
        assert results[1].raw_text == "It may be patent." and results[1].image_index == 1
        assert chat.calls[0][0][0].text.startswith("This is a digital subtraction angiography image.")

    def test_uncertain_is_retried_by_sampling_only_when_the_profile_allows(self) -> None:
        profile = parse_profile(
            {**get_profile("dsa-patency").model_dump(mode="json"), "generation": {"retries": 1}}
        )
        chat = ScriptedChat(["unclear", "patent", "blocked"])
        results = PatencyClassifier(profile, chat).classify([_xa(0, 0), _xa(0, 1)])
        assert [len(reqs) for reqs, _ in chat.calls] == [2, 1]
        assert results[0].label == "blocked" and results[1].label == "patent"
        assert "JSON" not in chat.calls[1][0][0].text  # no corrective JSON suffix

    def test_result_serialises_for_audit_result_classification(self) -> None:
        result = ClassificationResult(label="blocked", needs_review=False, urgent=True, raw_text="x")
        assert result.model_dump()["label"] == "blocked"

    def test_non_classification_profile_is_refused(self) -> None:
        with pytest.raises(ProfileError, match="not classification"):
            PatencyClassifier(get_profile("cxr-auditor-v2"), ScriptedChat([]))


@pytest.mark.slow
def test_dsa_profile_end_to_end_on_the_trained_tiny_model(trained_gemma: Path) -> None:
    profile = parse_profile(tiny_profile("dsa-patency", trained_gemma, adapter=None))
    results = PatencyClassifier(profile).classify([_xa(0, 0), _xa(255, 1)])
    assert [(r.label, r.urgent) for r in results] == [("patent", False), ("blocked", True)]
    assert results[1].raw_text == "The vessel is occluded."


def test_dsa_profile_merges_its_adapter_and_sends_noise_to_review(
    tiny_gemma: Path, lora_adapter: Path
) -> None:
    """With its LoRA merged (delta verified), an untrained model's noise is never 'patent'."""
    profile = parse_profile(
        tiny_profile("dsa-patency", tiny_gemma, adapter=str(lora_adapter), generation={"max_new_tokens": 8})
    )
    classifier = PatencyClassifier(profile)
    assert classifier.chat.loaded.merge_delta > 0.01  # type: ignore[attr-defined]
    (result,) = classifier.classify([_xa(0)])
    assert (result.label, result.needs_review, result.urgent) == ("uncertain", True, False)
