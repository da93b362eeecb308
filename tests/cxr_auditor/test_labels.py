"""Tests for cxr_auditor.labels: order, display names, synonyms, urgent set."""

from __future__ import annotations

import pytest

from cxr_auditor.labels import (
    DEFAULT_URGENT,
    DISPLAY_NAMES,
    LABELS,
    POSITIVE_LABELS,
    SYNONYMS,
    Label,
    display_name,
    normalize_label,
    parse_urgent,
    sort_labels,
)


def test_canonical_order() -> None:
    assert [lab.value for lab in LABELS] == [
        "pleural_effusion",
        "pneumothorax",
        "lung_opacity_consolidation",
        "nodule_mass",
        "cardiomegaly",
        "no_finding",
    ]
    assert LABELS[:5] == POSITIVE_LABELS


def test_label_accepts_its_plain_string() -> None:
    assert Label("nodule_mass") is Label.NODULE_MASS
    assert Label.NODULE_MASS == "nodule_mass"


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("Pleural Effusion", Label.PLEURAL_EFFUSION),
        ("pleural-effusion", Label.PLEURAL_EFFUSION),
        ("  NODULE   MASS  ", Label.NODULE_MASS),
        ("nodule/mass", Label.NODULE_MASS),
        ("Nodule or mass", Label.NODULE_MASS),
        ("mass", Label.NODULE_MASS),
        ("effusion", Label.PLEURAL_EFFUSION),
        ("consolidation", Label.LUNG_OPACITY_CONSOLIDATION),
        ("opacity", Label.LUNG_OPACITY_CONSOLIDATION),
        ("lung opacity", Label.LUNG_OPACITY_CONSOLIDATION),
        ("Lung opacity / consolidation", Label.LUNG_OPACITY_CONSOLIDATION),
        ("no finding", Label.NO_FINDING),
        ("No finding.", Label.NO_FINDING),
        ("normal", Label.NO_FINDING),
        ("Enlarged heart", Label.CARDIOMEGALY),
        ("PTX", Label.PNEUMOTHORAX),
    ],
)
def test_synonyms_normalise(raw: str, label: Label) -> None:
    assert normalize_label(raw) is label


@pytest.mark.parametrize("raw", ["atelectasis", "fracture", "", "   ", "aortic enlargement"])
def test_unmapped_text_gives_none(raw: str) -> None:
    assert normalize_label(raw) is None


@pytest.mark.parametrize("raw", [None, 5, ["pneumothorax"], {"label": "pneumothorax"}])
def test_non_string_gives_none(raw: object) -> None:
    assert normalize_label(raw) is None


def test_every_canonical_label_maps_to_itself_and_every_synonym_is_canonical() -> None:
    for label in LABELS:
        assert normalize_label(label.value) is label
    assert set(SYNONYMS.values()) == set(LABELS)


def test_display_names() -> None:
    assert set(DISPLAY_NAMES) == set(LABELS)
    assert display_name("nodule_mass") == "Nodule / mass"
    assert display_name(Label.CARDIOMEGALY) == "Cardiomegaly (enlarged heart)"
    assert display_name("rib_fracture") == "Rib fracture"


def test_sort_labels_dedupes_in_canonical_order() -> None:
    raw = ["no_finding", Label.CARDIOMEGALY, "pleural_effusion", "cardiomegaly"]
    assert sort_labels(raw) == [Label.PLEURAL_EFFUSION, Label.CARDIOMEGALY, Label.NO_FINDING]


class TestUrgent:
    def test_default(self) -> None:
        assert frozenset({Label.PNEUMOTHORAX, Label.NODULE_MASS}) == DEFAULT_URGENT

    def test_configured_strings_validated(self) -> None:
        assert parse_urgent(["pneumothorax", "cardiomegaly"]) == {Label.PNEUMOTHORAX, Label.CARDIOMEGALY}

    def test_no_finding_rejected(self) -> None:
        with pytest.raises(ValueError, match="positive labels"):
            parse_urgent(["no_finding"])

    def test_unknown_label_rejected(self) -> None:
        with pytest.raises(ValueError):
            parse_urgent(["fracture"])
