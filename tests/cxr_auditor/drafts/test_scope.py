"""The scope model of the rules parser: coordination, clause ends, and what follows from them.

Every sentence here was written for these tests to capture a pattern seen in real reports
(docs/draft-parser.md, "Error classes on real reports"); none is copied from a report set.
"""

from __future__ import annotations

import pytest

from cxr_auditor.drafts import scope
from cxr_auditor.drafts.negex import NegExDraftParser
from cxr_auditor.drafts.rules import clear_sentence_cache, parse_draft, sentence_cache_hit_rate
from cxr_auditor.labels import Label
from cxr_auditor.schema import DraftStatus

E = Label.PLEURAL_EFFUSION
P = Label.PNEUMOTHORAX
O = Label.LUNG_OPACITY_CONSOLIDATION  # noqa: E741 - the label's usual one-letter name
N = Label.NODULE_MASS
C = Label.CARDIOMEGALY
NF = Label.NO_FINDING
PRESENT, ABSENT, UNCERTAIN = DraftStatus.PRESENT, DraftStatus.ABSENT, DraftStatus.UNCERTAIN


def statuses(text: str) -> dict[Label, DraftStatus]:
    result = parse_draft(text)
    for f in result.findings:
        assert text[f.start : f.end] == f.span  # spans stay verbatim with offsets
    return {f.label: f.status for f in result.findings}


# --- coordination: a negation distributes over its list ---------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "No focal airspace disease, pneumothorax or large pleural effusion.",
        "No focal airspace disease, pneumothorax, or large pleural effusion.",
        "No acute consolidation, displaced fracture, pneumothorax or significant effusion.",
        "Negative for pneumothorax, definite effusion or focal consolidation.",
        "There is no pneumothorax, sizeable left effusion, or lobar consolidation.",
        "Neither pneumothorax nor pleural effusion nor consolidation is present.",
        "No consolidation, pneumothorax or pleural effusion identified.",
        "No appreciable edema, focal consolidation, pleural effusions or pneumothorax seen.",
        "No pneumothorax and no pleural effusion or focal consolidation.",
    ],
)
def test_a_negation_distributes_over_its_list(text: str) -> None:
    got = statuses(text)
    assert got[P] is ABSENT and got[E] is ABSENT and got[O] is ABSENT, got


@pytest.mark.parametrize(
    ("text", "label"),
    [
        # a bare comma then a size word, a side or a verb opens a new statement
        ("No pneumothorax, small left pleural effusion.", E),
        ("No pneumothorax, moderate right effusion and basilar consolidation.", O),
        ("No pneumothorax, there is a right lower lobe consolidation.", O),
        # "and" alone does not make a list of alternatives
        ("No pneumothorax, mild cardiomegaly and small bilateral effusions.", E),
    ],
)
def test_a_new_statement_after_a_list_is_asserted(text: str, label: Label) -> None:
    got = statuses(text)
    assert got[P] is ABSENT and got[label] is PRESENT, got


def test_without_denies_inside_a_positive_sentence() -> None:
    got = statuses("Hyperinflated lungs without focal consolidation, pneumothorax or large effusion.")
    assert (got[O], got[P], got[E]) == (ABSENT, ABSENT, ABSENT)
    got = statuses("Enlarged heart without pleural effusion.")
    assert got[C] is PRESENT and got[E] is ABSENT


def test_a_backward_negation_covers_the_list_it_closes() -> None:
    got = statuses("Consolidation, pleural effusion or pneumothorax is not seen.")
    assert (got[O], got[E], got[P]) == (ABSENT, ABSENT, ABSENT)
    got = statuses("Right basilar consolidation, pneumothorax is not seen.")
    assert got[O] is PRESENT and got[P] is ABSENT


@pytest.mark.parametrize(
    ("text", "denied", "kept"),
    [
        ("No pneumothorax but a small right effusion.", P, E),
        ("No effusion; however, there is left basilar consolidation.", E, O),
        ("No pneumothorax, although the heart is enlarged.", P, C),
        ("No pleural effusion except a tiny right pneumothorax.", E, P),
    ],
)
def test_terminators_end_a_scope(text: str, denied: Label, kept: Label) -> None:
    got = statuses(text)
    assert got[denied] is ABSENT and got[kept] is PRESENT, got


def test_pseudo_negation_hedges_history_and_resolution() -> None:
    assert statuses("No change in the small left pleural effusion.")[E] is PRESENT
    assert statuses("Possible small right pneumothorax.")[P] is UNCERTAIN
    assert statuses("Pneumothorax cannot be excluded.")[P] is UNCERTAIN
    assert P not in statuses("INDICATION: Evaluate for pneumothorax.\nFINDINGS: Lungs clear.")
    assert statuses("The right pleural effusion has resolved.")[E] is ABSENT


def test_a_later_sentence_never_erases_an_earlier_finding() -> None:
    text = (
        "FINDINGS: Heart size is normal. No focal airspace consolidation, pneumothorax or "
        "large pleural effusion. Mild spondylosis. There is a thin lucent line at the "
        "right apex. This could represent a small right apical pneumothorax."
    )
    got = statuses(text)
    assert got[P] is UNCERTAIN and got[E] is ABSENT
    text = "Small left pleural effusion. No pneumothorax. Lungs are otherwise clear."
    assert statuses(text)[E] is PRESENT


def test_versus_reaches_only_an_adjacent_alternative() -> None:
    got = statuses("Patchy basilar opacities representing infection versus chronic scarring.")
    assert got[O] is PRESENT
    assert statuses("Small pleural effusion versus pleural thickening.")[E] is UNCERTAIN


def test_and_or_coordinates_and_does_not_hedge() -> None:
    assert statuses("Left basilar airspace disease and/or atelectasis.")[O] is PRESENT


def test_a_nodular_opacity_is_a_nodule_unless_its_clause_names_one() -> None:
    got = statuses("There is a 12 mm nodular opacity in the right upper lobe.")
    assert got[N] is PRESENT
    got = statuses("Nodular opacity in the left midlung which could represent a pulmonary nodule.")
    assert got[N] is UNCERTAIN
    # a hedged cause hedges the cause only
    assert statuses("Rounded opacity at the left apex, possibly infection.")[N] is PRESENT


def test_a_lesion_outside_the_lung_is_not_a_nodule() -> None:
    assert N not in statuses("Lytic lesion of the right posterior 7th rib.")
    assert N not in statuses("Chest wall mass is again noted.")
    assert statuses("Nodule projecting over the right 4th anterior rib.")[N] is PRESENT


def test_hypothetical_mentions_state_nothing() -> None:
    assert N not in statuses("CT is more sensitive to detect a small nodule.")
    assert N not in statuses("Overlying ribs could obscure a small nodule.")


def test_two_words_for_one_finding_stay_one_noun_phrase() -> None:
    assert statuses("The previously noted mass lesion is no longer seen.")[N] is ABSENT


def test_normal_study_and_heart_phrasing() -> None:
    assert statuses("No active or acute pleural, pulmonary or cardiac disease.")[NF] is PRESENT
    got = statuses("Normal size and configuration of the cardiac silhouette. The lungs are clear.")
    assert got[C] is ABSENT and got[NF] is PRESENT
    assert statuses("The heart is large.")[C] is PRESENT
    assert statuses("Marked interval increase in heart size.")[C] is PRESENT
    assert statuses("No increase in heart size.")[C] is ABSENT


# --- the coordination table on its own ---------------------------------------------------------
@pytest.mark.parametrize(
    ("words", "closed", "member"),
    [
        (["or", "pneumothorax", "is", "seen"], False, True),
        (["pneumothorax"], False, True),
        (["large", "effusion"], False, True),
        (["small", "effusion"], False, False),
        (["small", "effusion"], True, True),
        (["the", "heart", "is", "enlarged"], True, False),
        (["pneumothorax", "or", "effusion", "identified"], True, True),
        (["a", "b", "c", "d", "e", "f", "g"], False, False),
    ],
)
def test_membership_table(words: list[str], closed: bool, member: bool) -> None:
    assert scope.is_member(words, opens_with_cue=False, closed=closed) is member


def test_a_piece_that_opens_with_a_cue_is_a_new_statement() -> None:
    assert not scope.is_member(["possible", "effusion"], opens_with_cue=True, closed=True)


def test_negex_baseline_is_sentence_scoped() -> None:
    """The baseline reads a whole sentence after "no" as denied: right for lists, wrong for a
    new statement after a comma, which is what the scope model is for."""
    negex = NegExDraftParser()
    got = {f.label: f.status for f in negex.parse("No pneumothorax, small left effusion.").findings}
    assert got[P] is ABSENT and got[E] is ABSENT
    got = {f.label: f.status for f in negex.parse("Possible right effusion. No pneumothorax.").findings}
    assert got[E] is UNCERTAIN and got[P] is ABSENT


def test_a_cached_sentence_reading_is_rebased_and_never_shared() -> None:
    """Sentence readings are cached: the same sentence at another offset, or answered by a
    following "None seen.", must come out as if read for the first time."""
    clear_sentence_cache()
    first = parse_draft("Assess for pneumothorax. None seen.")
    again = parse_draft("Assess for pneumothorax. None seen.")
    assert first == again and statuses("Assess for pneumothorax. None seen.")[P] is ABSENT
    shifted = "Heart size is normal. Assess for pneumothorax."
    assert P not in statuses(shifted)  # the earlier answer did not leak into the cached reading
    moved = parse_draft("Lungs are clear. Small left pleural effusion.")
    effusion = next(f for f in moved.findings if f.label is E)
    assert effusion.span == "Small left pleural effusion" and effusion.start == 17


def test_the_cache_hit_rate_counts_repeated_sentences() -> None:
    clear_sentence_cache()
    assert sentence_cache_hit_rate() == 0.0
    parse_draft("No pneumothorax. Small left pleural effusion.")
    assert sentence_cache_hit_rate() == 0.0
    parse_draft("Heart size is normal. No pneumothorax.")
    assert sentence_cache_hit_rate() == 0.25  # 1 of 4 readings repeated
