"""Tests for cxr_auditor.parsing.

The 50 vectors of reference-notes.md §4.2 are ported below, keyed ``vNN``. Where CONTRACT.md
decides differently from the reference, the expected value is ours and a ``# contract:`` comment
says why.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_auditor.errors import ParseError
from cxr_auditor.labels import Label
from cxr_auditor.parsing import (
    LOC_TOKEN_RE,
    MAX_ELEMENTS,
    coerce_box,
    extract_finding_list,
    loc_tokens_to_boxes,
    parse_draft_output,
    parse_grounding_output,
    salvage_finding_list,
    span_laterality,
    strip_reasoning,
)
from cxr_auditor.schema import Box, DraftStatus, GroundingState, Laterality

_NODULE = '{"label": "nodule_mass", "box_2d": [0.2, 0.3, 0.4, 0.5]}'

# --------------------------------------------------------------------------------------------
# Vectors, by stage
# --------------------------------------------------------------------------------------------

# E: extract_finding_list. Expected: the list, or a substring of the ParseError message.
E_VECTORS: list[tuple[str, str, list[dict[str, Any]] | str]] = [
    (
        "v01",
        'Findings: [{"label": "pleural_effusion", "box_2d": [0.6, 0.1, 0.9, 0.4]}]',
        [{"label": "pleural_effusion", "box_2d": [0.6, 0.1, 0.9, 0.4]}],
    ),
    (
        "v02",
        '```json\n[{"label": "pneumothorax", "box_2d": null}]\n```',
        [{"label": "pneumothorax", "box_2d": None}],
    ),
    (
        "v03",
        '{"label": "cardiomegaly", "box_2d": [0.2, 0.2, 0.8, 0.8]}',
        [{"label": "cardiomegaly", "box_2d": [0.2, 0.2, 0.8, 0.8]}],
    ),
    (
        "v04",
        '[{"label": "nodule_mass", "evidence": "mass [right upper lobe]"}]',
        [{"label": "nodule_mass", "evidence": "mass [right upper lobe]"}],
    ),
    (
        "v05",
        '[{"evidence": "opacity with \\"halo\\" and ] bracket", "label": "nodule_mass"}]',
        [{"evidence": 'opacity with "halo" and ] bracket', "label": "nodule_mass"}],
    ),
    ("v06", "[1, 2, 3]", "not objects"),
    ("v07", "no json at all", "no JSON"),
    ("v08", '[{"label": "pneumothorax"}', [{"label": "pneumothorax"}]),
    ("v09", '[{"label": ', "not balanced"),
    ("v10", '[{"label": "pneumothorax",}]', "invalid"),
    (
        "v11",
        '[{"label":"pleural_effusion","box_2d":[0.62,0.08,0.94,0.4]}, '
        '{"label":"cardiomegaly","box_2d":[0.5,0.3,0.9,0.75]}, '
        '{"label":"nodule_mass","box_2d":[0.2',
        [
            {"label": "pleural_effusion", "box_2d": [0.62, 0.08, 0.94, 0.4]},
            {"label": "cardiomegaly", "box_2d": [0.5, 0.3, 0.9, 0.75]},
        ],
    ),
    (
        "v12",
        '[{"label": "cardiomegaly"}, {"label": "pneumothorax",}]',
        [{"label": "cardiomegaly"}],
    ),
    # contract: the reference gave up at the prose bracket "[draft]"; we skip a balanced
    # array that is not JSON and take the next one.
    ("v45", 'Findings [draft]: [{"label":"cardiomegaly"}]', [{"label": "cardiomegaly"}]),
]

# S: salvage_finding_list.
S_VECTORS: list[tuple[str, str, list[dict[str, Any]]]] = [
    (
        "v13",
        '[{"label": "pleural_effusion", "box_2d": null}, {"label": "pneumo',
        [{"label": "pleural_effusion", "box_2d": None}],
    ),
    (
        "v14",
        '[{"label": "cardiomegaly"}, {"label": "nodule_mass"},',
        [{"label": "cardiomegaly"}, {"label": "nodule_mass"}],
    ),
    (
        "v15",
        'Sure, here are the findings: [{"label": "pneumothorax"}, {"label": "card',
        [{"label": "pneumothorax"}],
    ),
    ("v16", '```json\n[{"label": "pneumothorax"}, {"label": "card', [{"label": "pneumothorax"}]),
    (
        "v17",
        '[{"label": "cardiomegaly"}, {"label": "pneumothorax",}, {"label": "nodule_mass"}',
        [{"label": "cardiomegaly"}],
    ),
    (
        "v18",
        '[{"label": "cardiomegaly"}] trailing prose {"label": "pneumothorax"}',
        [{"label": "cardiomegaly"}],
    ),
    (
        "v19",
        "[" + ", ".join([_NODULE] * 100) + ', {"label": "trunca',
        [json.loads(_NODULE)] * MAX_ELEMENTS,
    ),
]

_Summary = list[tuple[str, tuple[float, ...] | None]]

# G: parse_grounding_output. Expected: [(label, box as tuple or None)] for state ok, or
# "inconclusive".
G_VECTORS: list[tuple[str, str, _Summary | str]] = [
    (
        "v20",
        "[" + ", ".join([_NODULE] * 80) + ', {"label": "nodule_m',
        [("nodule_mass", (0.2, 0.3, 0.4, 0.5))],
    ),
    (
        "v21",
        '[{"label":"aortic_enlargement","box_2d":[0.1,0.1,0.2,0.2]},'
        '{"label":"cardiomegaly","box_2d":null}]',
        [("cardiomegaly", None)],
    ),
    ("v22", '[{"label":"Pleural Effusion","box_2d":null}]', [("pleural_effusion", None)]),
    (
        "v23",
        '[{"label":"cardiomegaly","box_2d":[0.1,0.2,0.3]},'
        '{"label":"pleural_effusion","box_2d":[2.0,0.0,3.0,1.0]},'
        '{"label":"nodule_mass","box_2d":[0.9,0.1,0.2,0.4]}]',
        # contract: values above 1 and up to 1000 are the 0-1000 convention (rescaled, not
        # dropped), and inverted corners are reordered (not dropped).
        [
            ("cardiomegaly", None),
            ("pleural_effusion", (0.002, 0.0, 0.003, 0.001)),
            ("nodule_mass", (0.2, 0.1, 0.9, 0.4)),
        ],
    ),
    (
        "v24",
        '[{"label":"cardiomegaly","box_2d":[0.9,0.9,0.1,0.1]}]',
        # contract: inverted corners are reordered.
        [("cardiomegaly", (0.1, 0.1, 0.9, 0.9))],
    ),
    (
        "v25",
        '[{"label":"cardiomegaly","box_2d":["a",0.1,0.2,0.3]}]',
        [("cardiomegaly", None)],
    ),
    (
        "v27",
        '[{"label":5,"box_2d":null},{"label":"cardiomegaly"}]',
        [("cardiomegaly", None)],
    ),
    (
        "v29",
        '[{"label":"lung_opacity_consolidation","box_2d":[0.2,0.1,0.5,0.3]},'
        '{"label":"lung_opacity_consolidation","box_2d":[0.2,0.6,0.5,0.9]}]',
        [
            ("lung_opacity_consolidation", (0.2, 0.1, 0.5, 0.3)),
            ("lung_opacity_consolidation", (0.2, 0.6, 0.5, 0.9)),
        ],
    ),
    (
        "v30",
        '[{"label":"lung_opacity_consolidation","box_2d":[0.2,0.1,0.5,0.3]},'
        '{"label":"nodule_mass","box_2d":[0.2,0.1,0.5,0.3]}]',
        [
            ("lung_opacity_consolidation", (0.2, 0.1, 0.5, 0.3)),
            ("nodule_mass", (0.2, 0.1, 0.5, 0.3)),
        ],
    ),
    (
        "v31",
        '[{"label":"cardiomegaly","box_2d":null},{"label":"cardiomegaly","box_2d":null}]',
        [("cardiomegaly", None)],
    ),
    (
        "v32",
        '[{"label":"no_finding","box_2d":null,"confidence":0.9}]',
        [("no_finding", None)],
    ),
    (
        "v46",
        '{"findings":[{"label":"pneumothorax","box_2d":[0.1,0.5,0.4,0.9]}]}',
        # contract: a wrapper object is unwrapped; the reference read it as a normal study.
        [("pneumothorax", (0.1, 0.5, 0.4, 0.9))],
    ),
    (
        "v47",
        '[{"label":"nodule/mass","box_2d":[0.2,0.3,0.4,0.5]},'
        '{"label":"lung opacity","box_2d":null}]',
        # contract: labels go through the synonym table; the reference dropped both.
        [("nodule_mass", (0.2, 0.3, 0.4, 0.5)), ("lung_opacity_consolidation", None)],
    ),
    (
        "v48",
        '[{"label":"pleural_effusion","box_2d":[620,80,940,400]}]',
        # contract: 0-1000 boxes are rescaled; the reference dropped the box.
        [("pleural_effusion", (0.62, 0.08, 0.94, 0.4))],
    ),
]

_DRAFT = "Left pleural effusion. No pneumothorax."

# D: parse_draft_output. Expected: [(label, status, span)], or a ParseError marker.
D_VECTORS: list[tuple[str, str, str, list[tuple[str, str, str]] | None]] = [
    (
        "v33",
        '[{"label":"pleural_effusion","status":"present","span":"Left pleural effusion"},'
        '{"label":"pneumothorax","status":"absent","span":"No pneumothorax"}]',
        _DRAFT,
        [
            ("pleural_effusion", "present", "Left pleural effusion"),
            ("pneumothorax", "absent", "No pneumothorax"),
        ],
    ),
    (
        "v34",
        '```json\n[{"label": "cardiomegaly", "status": "present"}]\n```',
        "Cardiomegaly.",
        # contract: spans must be verbatim substrings of the draft; an element without one is
        # dropped with a note instead of carrying span None.
        [],
    ),
    (
        "v35",
        '[{"label":"cardiomegaly","span":"Cardiomegaly"},'
        '{"label":"pneumothorax","status":null,"span":"pneumothorax"},'
        '{"label":"pleural_effusion","status":"likely","span":"effusion"}]',
        "Cardiomegaly. Small pneumothorax. Effusion.",
        # contract: a missing or null status is present; an unknown word ("likely") is dropped,
        # never guessed into present.
        [("cardiomegaly", "present", "Cardiomegaly"), ("pneumothorax", "present", "pneumothorax")],
    ),
    (
        "v36",
        '[{"label":"atelectasis","status":"present","span":"Atelectasis"},'
        '{"label":"pneumothorax","status":"present","span":"pneumothorax"}]',
        "Atelectasis. Right pneumothorax.",
        [("pneumothorax", "present", "pneumothorax")],
    ),
    (
        "v37",
        '[{"label":"cardiomegaly","status":"present","span":7}]',
        "Cardiomegaly.",
        # contract: a non-string span cannot be anchored, so the element is dropped.
        [],
    ),
    (
        "v38",
        '[{"label":"cardiomegaly","status":"present","span":"first"},'
        '{"label":"cardiomegaly","status":"present","span":"second"}]',
        "first and second",
        [("cardiomegaly", "present", "first")],
    ),
    (
        "v39",
        '[{"label":"pneumothorax","status":"present","span":"pneumothorax"},'
        '{"label":"pneumothorax","status":"absent","span":"No pneumothorax"}]',
        "Small pneumothorax. No pneumothorax.",
        [
            ("pneumothorax", "present", "pneumothorax"),
            ("pneumothorax", "absent", "No pneumothorax"),
        ],
    ),
    (
        "v40",
        '{"label": "no_finding", "status": "present", "span": "Normal chest"}',
        "Normal chest.",
        [("no_finding", "present", "Normal chest")],
    ),
    (
        "v41",
        'Here is the result: [{"label": "cardiomegaly", "status": "present", '
        '"span": "Cardiomegaly"}] Done.',
        "Cardiomegaly.",
        [("cardiomegaly", "present", "Cardiomegaly")],
    ),
    ("v42", "the model said nothing parseable", "Cardiomegaly.", None),
    ("v43", "[]", "Cardiomegaly.", []),
    (
        "v49",
        '[{"label":"pneumothorax","status":"negative","span":"No pneumothorax"},'
        '{"label":"pleural_effusion","status":"denied","span":"No effusion"},'
        '{"label":"cardiomegaly","status":"no","span":"heart size normal"}]',
        "No pneumothorax. No effusion. heart size normal.",
        # contract: denial words mean absent; the reference flipped them into present.
        [
            ("pneumothorax", "absent", "No pneumothorax"),
            ("pleural_effusion", "absent", "No effusion"),
            ("cardiomegaly", "absent", "heart size normal"),
        ],
    ),
]

R_VECTORS: list[tuple[str, str, str]] = [
    ("v44", "<THINK>line one\nline two [stray</THINK>[2]", "[2]"),
    # contract: an unclosed (truncated) reasoning block is dropped, so its brackets can never
    # be read as the answer; the reference left it in place.
    ("v50", "<think>reasoning mentions [a, b]", ""),
]


def _ids(vectors: list[tuple[Any, ...]]) -> list[str]:
    return [v[0] for v in vectors]


def test_every_reference_vector_is_ported() -> None:
    ported: set[str] = set()
    for vectors in (E_VECTORS, S_VECTORS, G_VECTORS, D_VECTORS, R_VECTORS):
        ported |= set(_ids(vectors))
    # v26 (confidence) and v28 (duplicate keeps first confidence) check fields beyond the
    # (label, box) summary; they have their own tests below.
    ported |= {"v26", "v28"}
    assert ported == {f"v{i:02d}" for i in range(1, 51)}


@pytest.mark.parametrize(("vid", "text", "expected"), E_VECTORS, ids=_ids(E_VECTORS))
def test_extract_vectors(vid: str, text: str, expected: list[dict[str, Any]] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ParseError, match=expected) as info:
            extract_finding_list(text)
        assert info.value.raw_text == text
    else:
        assert extract_finding_list(text) == expected


@pytest.mark.parametrize(("vid", "text", "expected"), S_VECTORS, ids=_ids(S_VECTORS))
def test_salvage_vectors(vid: str, text: str, expected: list[dict[str, Any]]) -> None:
    assert salvage_finding_list(text) == expected


def _summary(text: str) -> _Summary | str:
    result = parse_grounding_output(text)
    if result.state is not GroundingState.OK:
        return result.state.value
    return [
        (f.label.value, tuple(round(c, 6) for c in f.box.as_list()) if f.box else None)
        for f in result.findings
    ]


@pytest.mark.parametrize(("vid", "text", "expected"), G_VECTORS, ids=_ids(G_VECTORS))
def test_grounding_vectors(vid: str, text: str, expected: _Summary | str) -> None:
    assert _summary(text) == expected


@pytest.mark.parametrize(("vid", "text", "draft", "expected"), D_VECTORS, ids=_ids(D_VECTORS))
def test_draft_vectors(
    vid: str, text: str, draft: str, expected: list[tuple[str, str, str]] | None
) -> None:
    if expected is None:
        with pytest.raises(ParseError) as info:
            parse_draft_output(text, draft)
        assert info.value.raw_text == text
        return
    findings, _ = parse_draft_output(text, draft)
    assert [(f.label.value, f.status.value, f.span) for f in findings] == expected
    for f in findings:
        f.check_against(draft)


@pytest.mark.parametrize(("vid", "text", "expected"), R_VECTORS, ids=_ids(R_VECTORS))
def test_reasoning_vectors(vid: str, text: str, expected: str) -> None:
    assert strip_reasoning(text) == expected


def test_v26_confidence_kept_only_as_number_in_unit_range() -> None:
    for bad in ("9.0", '"high"', "true"):
        result = parse_grounding_output(f'[{{"label":"cardiomegaly","confidence":{bad}}}]')
        assert result.findings[0].confidence is None
        assert "confidence_dropped:invalid" in result.notes
    ok = parse_grounding_output('[{"label":"cardiomegaly","confidence":0.7}]')
    assert ok.findings[0].confidence == 0.7


def test_v28_duplicate_label_and_box_keeps_first_confidence() -> None:
    element = '{{"label":"nodule_mass","box_2d":[0.236,0.316,0.386,0.422],"confidence":{}}}'
    result = parse_grounding_output(f"[{element.format(0.8)}, {element.format(0.5)}]")
    assert len(result.findings) == 1
    assert result.findings[0].confidence == 0.8
    assert "duplicate_collapsed" in result.notes


# --------------------------------------------------------------------------------------------
# strip_reasoning
# --------------------------------------------------------------------------------------------


class TestStripReasoning:
    def test_complete_blocks_removed_case_insensitively(self) -> None:
        text = '<think>a [1]</think>\n<Think>b</THINK> [{"label": "ptx"}]'
        assert strip_reasoning(text) == '[{"label": "ptx"}]'

    def test_lone_closing_tag_drops_the_swallowed_reasoning(self) -> None:
        assert strip_reasoning("I think [x] is here\n</think>\n[]") == "[]"

    def test_unclosed_block_keeps_answer_after_blank_line(self) -> None:
        text = 'Answer:\n<think>weighing [a, b] options\n\n[{"label": "cardiomegaly"}]'
        assert strip_reasoning(text) == 'Answer:\n[{"label": "cardiomegaly"}]'

    def test_unclosed_block_takes_the_last_answer_paragraph(self) -> None:
        text = "<think>first\n\n[draft one]\nmore thought\n\n```json\n[]\n```"
        assert strip_reasoning(text) == "```json\n[]\n```"

    def test_unclosed_block_without_answer_paragraph_is_dropped(self) -> None:
        assert strip_reasoning("prefix <think>so the list is [1, 2] and") == "prefix"

    def test_text_without_tags_only_trimmed(self) -> None:
        assert strip_reasoning("  [1]\n") == "[1]"


# --------------------------------------------------------------------------------------------
# extract_finding_list: beyond the vectors
# --------------------------------------------------------------------------------------------


class TestExtractFindingList:
    def test_wrapper_with_other_keys_unwrapped(self) -> None:
        text = '{"note": "ok", "findings": [{"label": "cardiomegaly"}]}'
        assert extract_finding_list(text) == [{"label": "cardiomegaly"}]

    def test_wrapper_with_empty_list_is_an_empty_answer(self) -> None:
        assert extract_finding_list('{"findings": []}') == []

    def test_truncated_wrapper_salvaged(self) -> None:
        text = '{"findings": [{"label": "pneumothorax"}, {"label": "card'
        assert extract_finding_list(text) == [{"label": "pneumothorax"}]

    def test_degenerate_repetition_collapsed(self) -> None:
        text = "[" + ", ".join([_NODULE] * 30) + "]"
        assert extract_finding_list(text) == [json.loads(_NODULE)]

    def test_distinct_elements_capped(self) -> None:
        elements = [f'{{"label": "x{i}"}}' for i in range(MAX_ELEMENTS + 10)]
        assert len(extract_finding_list("[" + ",".join(elements) + "]")) == MAX_ELEMENTS

    def test_array_of_boxes_skipped_for_later_object_list(self) -> None:
        text = 'box [0.1, 0.2, 0.3, 0.4] then [{"label": "nodule_mass"}]'
        assert extract_finding_list(text) == [{"label": "nodule_mass"}]

    def test_object_without_label_is_last_resort(self) -> None:
        assert extract_finding_list('{"a": 1} and {"label": "x"}') == [{"label": "x"}]
        assert extract_finding_list('only {"a": 1}') == [{"a": 1}]

    def test_fence_inside_prose(self) -> None:
        text = 'Here:\n```json\n[{"label": "cardiomegaly"}]\n```\nThanks [1]'
        assert extract_finding_list(text) == [{"label": "cardiomegaly"}]

    def test_fence_after_the_answer_does_not_hide_it(self) -> None:
        text = '[{"label": "cardiomegaly"}]\n```\nnote: heart is wide\n```'
        assert extract_finding_list(text) == [{"label": "cardiomegaly"}]

    def test_reasoning_brackets_never_hijack_the_answer(self) -> None:
        text = '<think>maybe [{"label": "pneumothorax"}]?</think>[{"label": "cardiomegaly"}]'
        assert extract_finding_list(text) == [{"label": "cardiomegaly"}]


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


class TestCoerceBox:
    @pytest.mark.parametrize(
        ("value", "box", "note"),
        [
            (None, None, None),
            ([0.1, 0.2, 0.3, 0.4], (0.1, 0.2, 0.3, 0.4), None),
            ((0, 0, 1, 1), (0.0, 0.0, 1.0, 1.0), None),
            (["0.1", "0.2", "0.3", "0.4"], (0.1, 0.2, 0.3, 0.4), None),
            ([100, 200, 300, 400], (0.1, 0.2, 0.3, 0.4), "box_rescaled:0_1000"),
            ([0.5, 0.6, 0.1, 0.2], (0.1, 0.2, 0.5, 0.6), "box_reordered"),
            ([500, 600, 100, 200], (0.1, 0.2, 0.5, 0.6), "box_rescaled:0_1000+box_reordered"),
            ("0.1,0.2,0.3,0.4", None, "box_dropped:not_a_list"),
            ({"y0": 0.1}, None, "box_dropped:not_a_list"),
            ([0.1, 0.2, 0.3], None, "box_dropped:wrong_length"),
            ([0.1, 0.2, 0.3, 0.4, 0.5], None, "box_dropped:wrong_length"),
            ([0.1, None, 0.3, 0.4], None, "box_dropped:non_numeric"),
            ([0.1, True, 0.3, 0.4], None, "box_dropped:non_numeric"),
            ([0.1, float("nan"), 0.3, 0.4], None, "box_dropped:non_numeric"),
            ([-0.1, 0.2, 0.3, 0.4], None, "box_dropped:out_of_range"),
            ([10, 20, 30, 1001], None, "box_dropped:out_of_range"),
            ([0.3, 0.2, 0.3, 0.4], None, "box_dropped:zero_area"),
            ([0.1, 0.4, 0.3, 0.4], None, "box_dropped:zero_area"),
        ],
    )
    def test_table(
        self, value: object, box: tuple[float, ...] | None, note: str | None
    ) -> None:
        got, got_note = coerce_box(value)
        assert got_note == note
        if box is None:
            assert got is None
        else:
            assert got is not None
            assert got.as_list() == pytest.approx(list(box))


class TestLocTokens:
    def test_four_tokens_make_one_box_with_offsets(self) -> None:
        text = "effusion <loc0256><loc0000><loc0768><loc0512> right"
        [(box, start, end)] = loc_tokens_to_boxes(text)
        assert box == Box(y0=0.25, x0=0.0, y1=0.75, x1=0.5)
        assert text[start:end] == "<loc0256><loc0000><loc0768><loc0512>"

    def test_several_boxes_whitespace_between_tokens(self) -> None:
        text = "<loc0100> <loc0100> <loc0200> <loc0200>; <loc0300><loc0300><loc0400><loc0400>"
        boxes = loc_tokens_to_boxes(text)
        assert [round(b.y0 * 1024) for b, _, _ in boxes] == [100, 300]

    def test_invalid_groups_skipped(self) -> None:
        zero_area = "<loc0100><loc0100><loc0100><loc0200>"
        out_of_range = "<loc0100><loc0100><loc1024><loc0200>"
        three_only = "<loc0100><loc0100><loc0200>"
        assert loc_tokens_to_boxes(f"{zero_area} {out_of_range} {three_only}") == []

    def test_inverted_group_reordered(self) -> None:
        [(box, _, _)] = loc_tokens_to_boxes("<loc0512><loc0512><loc0256><loc0256>")
        assert box == Box(y0=0.25, x0=0.25, y1=0.5, x1=0.5)

    def test_token_regex_captures_bin(self) -> None:
        assert [m.group(1) for m in LOC_TOKEN_RE.finditer("<loc0007>x<loc1023>")] == [
            "0007",
            "1023",
        ]


# --------------------------------------------------------------------------------------------
# parse_grounding_output: states and notes
# --------------------------------------------------------------------------------------------


class TestParseGroundingOutput:
    def test_empty_list_is_inconclusive(self) -> None:
        result = parse_grounding_output("[]")
        assert result.state is GroundingState.INCONCLUSIVE
        assert result.findings == []
        assert result.notes == ["empty_list"]

    def test_only_unmapped_labels_inconclusive_and_kept(self) -> None:
        result = parse_grounding_output('[{"label": "Atelectasis"}, {"label": "fracture"}]')
        assert result.state is GroundingState.INCONCLUSIVE
        assert result.unmapped == ["Atelectasis", "fracture"]
        assert "no_usable_finding" in result.notes

    def test_no_finding_with_positives_positives_win(self) -> None:
        result = parse_grounding_output('[{"label": "no_finding"}, {"label": "cardiomegaly"}]')
        assert [f.label for f in result.findings] == [Label.CARDIOMEGALY]
        assert "no_finding_with_positives:positives_kept" in result.notes

    def test_image_index_and_evidence(self) -> None:
        result = parse_grounding_output(
            '[{"label": "cardiomegaly", "evidence": "wide heart"}, '
            '{"label": "pneumothorax", "evidence": 3}]',
            image_index=2,
        )
        assert [f.image_index for f in result.findings] == [2, 2]
        assert [f.evidence for f in result.findings] == ["wide heart", None]

    def test_notes_are_reason_codes_not_model_text(self) -> None:
        result = parse_grounding_output(
            '[{"label": "cardiomegaly", "box_2d": "SECRET-TEXT"}, {"label": {"x": 1}}]'
        )
        assert result.notes == ["box_dropped:not_a_list", "finding_dropped:label_not_text"]
        assert all("SECRET" not in n for n in result.notes)

    def test_long_unmapped_label_truncated(self) -> None:
        result = parse_grounding_output(json.dumps([{"label": "z" * 500}]))
        assert result.unmapped == ["z" * 80]

    def test_unparseable_raises_with_raw_text(self) -> None:
        with pytest.raises(ParseError) as info:
            parse_grounding_output("I cannot see an image.")
        assert info.value.raw_text == "I cannot see an image."


# --------------------------------------------------------------------------------------------
# parse_draft_output: statuses, spans, laterality
# --------------------------------------------------------------------------------------------


class TestParseDraftOutput:
    @pytest.mark.parametrize(
        ("word", "status"),
        [
            *[(w, DraftStatus.PRESENT) for w in ("present", "Positive", "yes", "TRUE")],
            *[(w, DraftStatus.ABSENT) for w in ("absent", "negative", "denied", "no", "none")],
            ("false", DraftStatus.ABSENT),
            *[
                (w, DraftStatus.UNCERTAIN)
                for w in ("uncertain", "possible", "probable", "hedged", "questionable")
            ],
            ("equivocal", DraftStatus.UNCERTAIN),
        ],
    )
    def test_status_words(self, word: str, status: DraftStatus) -> None:
        text = json.dumps([{"label": "pneumothorax", "status": word, "span": "pneumothorax"}])
        findings, notes = parse_draft_output(text, "Right pneumothorax.")
        assert [f.status for f in findings] == [status]
        assert notes == []

    @pytest.mark.parametrize("status", ["maybe", 3, ["present"]])
    def test_unknown_status_dropped_never_present(self, status: object) -> None:
        text = json.dumps([{"label": "pneumothorax", "status": status, "span": "pneumothorax"}])
        assert parse_draft_output(text, "No pneumothorax.") == (
            [],
            ["finding_dropped:status_unknown"],
        )

    def test_json_booleans(self) -> None:
        text = (
            '[{"label": "pneumothorax", "status": false, "span": "pneumothorax"},'
            ' {"label": "cardiomegaly", "status": true, "span": "Cardiomegaly"}]'
        )
        findings, _ = parse_draft_output(text, "Cardiomegaly. No pneumothorax.")
        assert [(f.label, f.status) for f in findings] == [
            (Label.PNEUMOTHORAX, DraftStatus.ABSENT),
            (Label.CARDIOMEGALY, DraftStatus.PRESENT),
        ]

    def test_span_reanchored_case_insensitively(self) -> None:
        draft = "Findings: LEFT PLEURAL EFFUSION."
        text = '[{"label": "effusion", "status": "present", "span": "left pleural effusion"}]'
        [finding], _ = parse_draft_output(text, draft)
        assert (finding.span, finding.start, finding.end) == ("LEFT PLEURAL EFFUSION", 10, 31)
        assert finding.laterality is Laterality.LEFT

    def test_span_reanchored_across_reflowed_whitespace(self) -> None:
        draft = "Possible right\n  basal consolidation."
        text = (
            '[{"label": "consolidation", "status": "possible",'
            ' "span": "possible right basal consolidation"}]'
        )
        [finding], _ = parse_draft_output(text, draft)
        assert finding.span == "Possible right\n  basal consolidation"
        finding.check_against(draft)
        assert finding.laterality is Laterality.RIGHT

    def test_case_folding_that_changes_length_keeps_offsets_right(self) -> None:
        # "İ".lower() is two characters, which would shift a lower-cased index.
        draft = "İİ LEFT EFFUSION."
        text = '[{"label": "effusion", "status": "present", "span": "left effusion"}]'
        [finding], _ = parse_draft_output(text, draft)
        assert finding.span == "LEFT EFFUSION"
        finding.check_against(draft)

    def test_span_not_in_draft_dropped(self) -> None:
        text = '[{"label": "pneumothorax", "status": "present", "span": "large pneumothorax"}]'
        assert parse_draft_output(text, "Small pneumothorax.") == (
            [],
            ["finding_dropped:span_not_in_draft"],
        )

    def test_unmapped_label_noted(self) -> None:
        text = '[{"label": "fracture", "status": "present", "span": "fracture"}]'
        assert parse_draft_output(text, "Rib fracture.") == (
            [],
            ["finding_dropped:label_unmapped"],
        )


@pytest.mark.parametrize(
    ("span", "side"),
    [
        ("Left pleural effusion", Laterality.LEFT),
        ("right apical pneumothorax", Laterality.RIGHT),
        ("bilateral effusions", Laterality.BILATERAL),
        ("effusions on both sides", Laterality.BILATERAL),
        ("left and right basal opacity", Laterality.BILATERAL),
        ("cardiomegaly", None),
        ("leftover bright spot", None),
    ],
)
def test_span_laterality(span: str, side: Laterality | None) -> None:
    assert span_laterality(span) is side


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_FRAGMENTS = [
    "[", "]", "{", "}", ",", ":", '"', "\\", " ", "\n", "```", "```json\n", "<think>",
    "</think>", '"label"', '"box_2d"', '"status"', '"span"', '"pneumothorax"', '"present"',
    '"absent"', "null", "0.1", "0.9", "500", "-1", "true", "x", "Findings:", "<loc0100>",
]
_JSONISH = st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)
_ANY_TEXT = st.one_of(st.text(max_size=200), _JSONISH)
_PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(_ANY_TEXT)
def test_strip_reasoning_never_raises(text: str) -> None:
    assert isinstance(strip_reasoning(text), str)


@_PROPS
@given(_ANY_TEXT, st.text(max_size=40))
def test_parsers_raise_only_parse_error(text: str, draft: str) -> None:
    for call in (
        lambda: extract_finding_list(text),
        lambda: parse_grounding_output(text),
        lambda: parse_draft_output(text, draft),
    ):
        try:
            call()
        except ParseError as exc:
            assert exc.raw_text == text


def _balanced_objects(text: str) -> list[object]:
    """Every value json.loads gives for a substring of ``text`` that starts with { and ends
    with } (brute force: the test must not share the scanner it checks)."""
    found = []
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        for j in range(i + 1, len(text)):
            if text[j] == "}":
                with contextlib.suppress(ValueError):
                    found.append(json.loads(text[i : j + 1]))
    return found


# "<" is left out: removing a complete reasoning block joins the text around it, which is
# reasoning handling, not salvage, and is covered by TestStripReasoning.
_NO_TAGS = st.lists(st.sampled_from([f for f in _FRAGMENTS if "<" not in f]), max_size=30).map(
    "".join
)


@_PROPS
@given(_NO_TAGS)
def test_salvage_never_invents_an_element(text: str) -> None:
    salvaged = salvage_finding_list(text)
    if salvaged:
        candidates = _balanced_objects(text)
        for element in salvaged:
            assert isinstance(element, dict)
            assert element in candidates


@_PROPS
@given(st.lists(st.sampled_from([_NODULE, '{"label": "cardiomegaly"}']), min_size=1, max_size=8))
def test_salvage_recovers_every_complete_element_before_a_cut(elements: list[str]) -> None:
    text = "[" + ", ".join(elements) + ', {"label": "pneu'
    assert salvage_finding_list(text) == [json.loads(e) for e in elements]


_LABEL_POOL = ["pneumothorax", "Pleural Effusion", "nodule/mass", "no finding", "normal",
               "cardiomegaly", "atelectasis", "", 5, None, ["x"]]  # fmt: skip
_BOX_POOL = st.one_of(
    st.none(),
    st.lists(st.floats(min_value=-1, max_value=1200, allow_nan=False), min_size=3, max_size=5),
    st.sampled_from(["0.1,0.2", [0.1, 0.2, 0.3, 0.4], [100, 200, 300, 400], [0.5, 0.5, 0.1, 0.1]]),
)
_ELEMENT = st.fixed_dictionaries(
    {"label": st.sampled_from(_LABEL_POOL), "box_2d": _BOX_POOL},
    optional={"confidence": st.one_of(st.floats(allow_nan=False), st.text(max_size=3))},
)
_REASON_CODE = r"^[a-z0-9_]+(:[a-z0-9_+]+)?$"


@_PROPS
@given(st.lists(_ELEMENT, max_size=12))
def test_grounding_output_invariants(elements: list[dict[str, Any]]) -> None:
    result = parse_grounding_output(json.dumps(elements))
    assert (result.state is GroundingState.OK) == bool(result.findings)
    labels = [f.label for f in result.findings]
    assert not (Label.NO_FINDING in labels and len(set(labels)) > 1)
    keys = [(f.label, f.box) for f in result.findings]
    assert len(keys) == len(set(keys))
    for note in result.notes:
        assert re.match(_REASON_CODE, note), note


@_PROPS
@given(
    st.one_of(
        st.lists(
            st.one_of(st.floats(), st.integers(), st.text(max_size=4), st.none(), st.booleans()),
            max_size=6,
        ),
        st.text(max_size=10),
        st.integers(),
        st.none(),
    )
)
def test_coerce_box_never_raises_and_explains_every_drop(value: object) -> None:
    box, note = coerce_box(value)
    if box is None and value is not None:
        assert note is not None and note.startswith("box_dropped:")
    if box is not None:
        assert 0.0 <= box.y0 < box.y1 <= 1.0 and 0.0 <= box.x0 < box.x1 <= 1.0
