"""Tests for cxr_auditor.prompts: pinned texts, laterality of the examples, hashing."""

from __future__ import annotations

import hashlib
import json

import pytest

from cxr_auditor.errors import DraftInputError
from cxr_auditor.geometry import Geometry
from cxr_auditor.labels import LABELS
from cxr_auditor.parsing import parse_draft_output, parse_grounding_output
from cxr_auditor.pipeline import box_laterality
from cxr_auditor.prompts import (
    CORRECTIVE_SUFFIX,
    DRAFT_PARSING_PROMPT_TEMPLATE,
    DRAFT_PLACEHOLDER,
    DSA_PATENCY_PROMPT,
    EXPLAIN_MY_XRAY_PROMPT,
    GROUNDING_EXAMPLES,
    GROUNDING_PROMPT,
    PROMPTS,
    build_draft_prompt,
    prompt_hash,
)
from cxr_auditor.schema import DraftStatus, Laterality


class TestGroundingPrompt:
    def test_names_every_label_exactly(self) -> None:
        for label in LABELS:
            assert label.value in GROUNDING_PROMPT

    def test_asks_for_label_and_box_only(self) -> None:
        assert '"label"' in GROUNDING_PROMPT and '"box_2d"' in GROUNDING_PROMPT
        assert "confidence" not in GROUNDING_PROMPT
        assert "evidence" not in GROUNDING_PROMPT

    def test_examples_are_embedded_verbatim(self) -> None:
        for description, answer in GROUNDING_EXAMPLES:
            assert f"{description}: {answer}" in GROUNDING_PROMPT

    @pytest.mark.parametrize(("description", "answer"), GROUNDING_EXAMPLES)
    def test_example_box_sits_on_the_side_its_text_names(self, description: str, answer: str) -> None:
        # PA display: the patient's left is on the image's right.
        result = parse_grounding_output(answer)
        geometry = Geometry.identity(1000, 1000)
        stated = {side for side in ("LEFT", "RIGHT") if f"a {side} " in description}
        for finding in result.findings:
            if finding.box is None:
                assert not stated
                continue
            pixel = geometry.to_source(finding.box)
            assert pixel is not None
            side = box_laterality(pixel, 1000, patient_left_on_image_right=True)
            assert side is Laterality(stated.pop().lower())

    def test_examples_cover_both_sides(self) -> None:
        descriptions = " ".join(d for d, _ in GROUNDING_EXAMPLES)
        assert "a RIGHT " in descriptions and "a LEFT " in descriptions


class TestDraftPrompt:
    def test_draft_goes_last_and_braces_survive(self) -> None:
        draft = "  Effusion {left}. No pneumothorax.  "
        prompt = build_draft_prompt(draft)
        assert prompt.endswith("Effusion {left}. No pneumothorax.")
        assert DRAFT_PLACEHOLDER not in prompt
        assert prompt.startswith(DRAFT_PARSING_PROMPT_TEMPLATE.split(DRAFT_PLACEHOLDER)[0])

    @pytest.mark.parametrize("draft", ["", "   ", "\n\t"])
    def test_empty_draft_rejected(self, draft: str) -> None:
        with pytest.raises(DraftInputError):
            build_draft_prompt(draft)

    def test_statuses_and_verbatim_spans_requested(self) -> None:
        for word in ('"present"', '"absent"', '"uncertain"', '"span"', "character for character"):
            assert word in DRAFT_PARSING_PROMPT_TEMPLATE

    def test_example_answer_parses_against_example_draft(self) -> None:
        template = DRAFT_PARSING_PROMPT_TEMPLATE
        draft = template.split("Example draft: ")[1].split("\n")[0]
        answer = template.split("Example answer: ")[1].split("\n")[0]
        findings, notes = parse_draft_output(answer, draft)
        assert notes == []
        assert [f.status for f in findings] == [
            DraftStatus.PRESENT,
            DraftStatus.UNCERTAIN,
            DraftStatus.ABSENT,
        ]
        assert [f.laterality for f in findings] == [Laterality.LEFT, Laterality.RIGHT, None]


def test_corrective_suffix_asks_for_one_list() -> None:
    assert CORRECTIVE_SUFFIX.startswith("\n\n")
    assert "[" in CORRECTIVE_SUFFIX and "]" in CORRECTIVE_SUFFIX


def test_fixed_prompts() -> None:
    assert EXPLAIN_MY_XRAY_PROMPT == "Locate abnormalities."
    assert "exactly one word" in DSA_PATENCY_PROMPT
    assert "patent" in DSA_PATENCY_PROMPT and "blocked" in DSA_PATENCY_PROMPT


def test_prompt_hash_is_sha256_prefix_and_changes_with_text() -> None:
    assert prompt_hash("abc") == hashlib.sha256(b"abc").hexdigest()[:16]
    assert len(prompt_hash(GROUNDING_PROMPT)) == 16
    assert prompt_hash(GROUNDING_PROMPT) != prompt_hash(GROUNDING_PROMPT + " ")


def test_prompt_registry() -> None:
    assert PROMPTS == {
        "grounding": GROUNDING_PROMPT,
        "draft_parsing": DRAFT_PARSING_PROMPT_TEMPLATE,
        "explain_my_xray": EXPLAIN_MY_XRAY_PROMPT,
        "dsa_patency": DSA_PATENCY_PROMPT,
    }
    assert len({prompt_hash(p) for p in PROMPTS.values()}) == len(PROMPTS)


def test_grounding_examples_are_json() -> None:
    for _, answer in GROUNDING_EXAMPLES:
        assert isinstance(json.loads(answer), list)
