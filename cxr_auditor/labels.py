"""The six canonical labels, their display names, the urgent set and the synonym table.

See CONTRACT.md ("Labels"). ``no_finding`` is the negative sentinel, exclusive with the five
positives. Model output is normalised through :data:`SYNONYMS`; anything that maps to nothing is
kept by the caller as *unmapped*, never dropped silently.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Label(StrEnum):
    """Canonical finding labels, in presentation order."""

    PLEURAL_EFFUSION = "pleural_effusion"
    PNEUMOTHORAX = "pneumothorax"
    LUNG_OPACITY_CONSOLIDATION = "lung_opacity_consolidation"
    NODULE_MASS = "nodule_mass"
    CARDIOMEGALY = "cardiomegaly"
    NO_FINDING = "no_finding"


LABELS: tuple[Label, ...] = tuple(Label)
POSITIVE_LABELS: tuple[Label, ...] = tuple(lab for lab in Label if lab is not Label.NO_FINDING)

DISPLAY_NAMES: dict[Label, str] = {
    Label.PLEURAL_EFFUSION: "Pleural effusion",
    Label.PNEUMOTHORAX: "Pneumothorax",
    Label.LUNG_OPACITY_CONSOLIDATION: "Lung opacity / consolidation",
    Label.NODULE_MASS: "Nodule / mass",
    Label.CARDIOMEGALY: "Cardiomegaly (enlarged heart)",
    Label.NO_FINDING: "No finding",
}

#: Default urgent set; sites override it in config (``audit.urgent_labels``).
DEFAULT_URGENT: frozenset[Label] = frozenset({Label.PNEUMOTHORAX, Label.NODULE_MASS})

_ORDER = {lab: i for i, lab in enumerate(LABELS)}

# Keys are already in normalised form (see _normalise_key).
SYNONYMS: dict[str, Label] = {
    # pleural_effusion
    "pleural_effusion": Label.PLEURAL_EFFUSION,
    "effusion": Label.PLEURAL_EFFUSION,
    "pleural_effusions": Label.PLEURAL_EFFUSION,
    "effusions": Label.PLEURAL_EFFUSION,
    "pleural_fluid": Label.PLEURAL_EFFUSION,
    "hydrothorax": Label.PLEURAL_EFFUSION,
    # pneumothorax
    "pneumothorax": Label.PNEUMOTHORAX,
    "pneumothoraces": Label.PNEUMOTHORAX,
    "ptx": Label.PNEUMOTHORAX,
    # lung_opacity_consolidation
    "lung_opacity_consolidation": Label.LUNG_OPACITY_CONSOLIDATION,
    "lung_opacity": Label.LUNG_OPACITY_CONSOLIDATION,
    "opacity": Label.LUNG_OPACITY_CONSOLIDATION,
    "consolidation": Label.LUNG_OPACITY_CONSOLIDATION,
    "lung_consolidation": Label.LUNG_OPACITY_CONSOLIDATION,
    "opacity_consolidation": Label.LUNG_OPACITY_CONSOLIDATION,
    "lung_opacity_or_consolidation": Label.LUNG_OPACITY_CONSOLIDATION,
    "airspace_opacity": Label.LUNG_OPACITY_CONSOLIDATION,
    "airspace_disease": Label.LUNG_OPACITY_CONSOLIDATION,
    "infiltrate": Label.LUNG_OPACITY_CONSOLIDATION,
    "infiltration": Label.LUNG_OPACITY_CONSOLIDATION,
    "pneumonia": Label.LUNG_OPACITY_CONSOLIDATION,
    # nodule_mass
    "nodule_mass": Label.NODULE_MASS,
    "nodule_or_mass": Label.NODULE_MASS,
    "mass_nodule": Label.NODULE_MASS,
    "nodule": Label.NODULE_MASS,
    "nodules": Label.NODULE_MASS,
    "mass": Label.NODULE_MASS,
    "masses": Label.NODULE_MASS,
    "lung_nodule": Label.NODULE_MASS,
    "lung_mass": Label.NODULE_MASS,
    "pulmonary_nodule": Label.NODULE_MASS,
    # cardiomegaly
    "cardiomegaly": Label.CARDIOMEGALY,
    "enlarged_heart": Label.CARDIOMEGALY,
    "enlarged_cardiac_silhouette": Label.CARDIOMEGALY,
    # no_finding
    "no_finding": Label.NO_FINDING,
    "no_findings": Label.NO_FINDING,
    "normal": Label.NO_FINDING,
    "none": Label.NO_FINDING,
    "no_abnormality": Label.NO_FINDING,
    "no_abnormalities": Label.NO_FINDING,
}

_SEPARATORS = re.compile(r"[\s\-/_,&+]+")


def _normalise_key(raw: str) -> str:
    """Lower-case, trim trailing punctuation, fold spaces/hyphens/slashes into underscores."""
    key = raw.strip().lower().strip(" .;:!\"'`")
    key = key.replace(" or ", "_or_").replace(" and ", "_")
    return _SEPARATORS.sub("_", key).strip("_")


def normalize_label(raw: object) -> Label | None:
    """Map a model-emitted label string onto a canonical :class:`Label`.

    Returns ``None`` when the text maps to nothing (the caller keeps it as unmapped).
    Non-string input also returns ``None``.
    """
    if not isinstance(raw, str):
        return None
    return SYNONYMS.get(_normalise_key(raw))


def display_name(label: Label | str) -> str:
    """Human-readable name of a label (falls back to a capitalised form)."""
    try:
        return DISPLAY_NAMES[Label(label)]
    except ValueError:
        return str(label).replace("_", " ").capitalize()


def sort_labels(labels: object) -> list[Label]:
    """Deduplicate and sort labels in canonical presentation order."""
    return sorted({Label(lab) for lab in labels}, key=_ORDER.__getitem__)  # type: ignore[attr-defined]


def parse_urgent(labels: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[Label]:
    """Validate a configured urgent list: every entry must be a canonical positive label."""
    out = set()
    for raw in labels:
        lab = Label(raw)
        if lab is Label.NO_FINDING:
            raise ValueError("urgent labels must be positive labels, not 'no_finding'")
        out.add(lab)
    return frozenset(out)
