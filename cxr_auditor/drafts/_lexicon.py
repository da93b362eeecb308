"""Word lists of the rule-based draft parser: mentions, triggers, section headers.

Everything here is matched against the lower-cased draft. A space in a pattern stands for any run
of whitespace (reports are hard-wrapped, so a phrase may cross a line break). The rules that use
these lists, and the reasons behind each choice, are in ``docs/draft-parser.md``.
"""

from __future__ import annotations

import re
import re._constants as _sre  # the parse tree of a pattern, read to index patterns by first char
import re._parser as _sre_parser
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cxr_auditor.labels import Label
from cxr_auditor.schema import DraftStatus

E = Label.PLEURAL_EFFUSION
P = Label.PNEUMOTHORAX
O = Label.LUNG_OPACITY_CONSOLIDATION  # noqa: E741 - the label's usual one-letter name
N = Label.NODULE_MASS
C = Label.CARDIOMEGALY
NF = Label.NO_FINDING

Target = Label | str


def rx(pattern: str) -> str:
    """Let a literal space in ``pattern`` match any whitespace run (line breaks included)."""
    return pattern.replace(" ", r"\s+")


@dataclass(frozen=True)
class Entry:
    """One mention pattern.

    ``fixed`` is a status the phrase carries by itself ("heart size is normal" is a denial);
    such phrases skip negation and hedging. ``indirect`` marks a sign of a label (costophrenic
    blunting for effusion) that defers to an explicit mention of the same label in its sentence,
    so "blunting which may represent a small effusion" is as uncertain as its explanation.
    ``shape`` marks a finding described by its shape ("nodular opacity" for a nodule): it also
    defers to an explicit mention in its clause, but a hedged cause ("nodular opacity, possibly
    infection") hedges only the cause, as for "opacity, likely atelectasis".
    """

    pattern: str
    targets: tuple[Target, ...]
    fixed: DraftStatus | None = None
    indirect: bool = False
    shape: bool = False


def _e(
    pattern: str, *targets: Target, fixed: DraftStatus | None = None, indirect: bool = False,
    shape: bool = False,
) -> Entry:
    return Entry(rx(pattern), targets, fixed, indirect or shape, shape)


ABSENT, PRESENT, UNCERTAIN = DraftStatus.ABSENT, DraftStatus.PRESENT, DraftStatus.UNCERTAIN

# "cardiomediastinal", also written "cardio-mediastinal" and "cardio mediastinal"
_CM = r"cardio(?:-|\s+)?mediastinal"
# Subjects of heart-size statements. "cardiothoracic ratio" only takes "increased".
_HEART = (
    r"(?:heart(?:\s+size)?"
    r"|cardiac(?:\s+and\s+mediastinal)?\s+(?:silhouettes?|size|shadow|contours?)"
    r"|cardiothymic\s+(?:silhouettes?|contours?|shadow)"
    rf"|{_CM}(?:\s+and\s+hilar)?\s+(?:silhouettes?|contours?|shadow|size)"
    r"|size\s+of\s+the\s+heart"
    r"|cardiothoracic\s+ratio)"
)
# Up to six words between subject and verdict that do not change the verdict ("and mediastinum
# are", "size is"). Words that would (enlarged, borderline, not, but) may not be skipped.
_GAP_NORMAL = (
    r"(?:[\s,:/]+(?!not\b|enlarg|promin|large|border|upper(?!\s+mediastin)|top\b|high\b|mild|moder|sever|increas"
    r"|but\b|although\b|however\b|though\b|except\b)[a-z-]+){0,6}?[\s,:/]+"
)
# A new heart subject ends the gap: "silhouette accentuated by technique, heart size mildly
# enlarged" holds two statements.
_GAP_ENLARGED = r"(?:[\s,:]+(?!not\b|normal\b|border|upper\b|top\b|heart\b)[a-z/-]+){0,12}?[\s,:]+"

# Phrases with a status of their own; matched before the single terms.
PHRASES: tuple[Entry, ...] = (
    # normal study
    _e(
        r"(?:no|without) (?:(?:radiographic|x-?ray|plain film|visible) )?"
        # "xxxx" is a de-identified word ("No XXXX of active disease")
        r"(?:(?:evidence|signs?|xxxx) of )?"
        r"(?:any )?(?:(?:definite|obvious|significant|evident) )?(?:acute|active)"
        r"(?: (?:or|and|/) (?:acute|active))? "
        # the organs as a list: "cardiac, pulmonary or pleural", "cardiopulmonary or thoracic"
        r"(?:(?:radiographic|cardiopulmonary|cardiothoracic|intrathoracic|thoracic|pulmonary"
        # (only chest organs: "no acute osseous abnormality" is not a normal study)
        r"|chest|cardiac|pleural|lung),? (?:(?:or|and) )?)*"
        r"(?:abnormalit(?:y|ies)|process(?:es)?|disease|findings?|pathology|changes?|issues?)",
        NF, fixed=PRESENT,
    ),
    _e(
        r"negative for (?:any )?acute (?:(?:cardiopulmonary|intrathoracic|chest) )?"
        r"(?:abnormalit(?:y|ies)|process|disease|findings?)",
        NF, fixed=PRESENT,
    ),
    _e(
        r"(?:normal|unremarkable|negative) (?:(?:pa and lateral|frontal and lateral|portable) )?"
        r"(?:chest(?: (?:radiographs?|x-?rays?|films?|study|exam(?:ination)?|series))?|study|"
        r"exam(?:ination)?|radiographs?|x-?rays?|cxr)\b",
        NF, fixed=PRESENT,
    ),
    _e(
        r"(?:chest|study|exam(?:ination)?|radiographs?|chest radiographs?|chest x-?rays?|cxr) "
        r"(?:is |are |appears? )?(?:normal|unremarkable|negative|within normal limits)",
        NF, fixed=PRESENT,
    ),
    _e(
        r"(?:cxr|chest x-?ray|chest radiograph)(?: (?:\d\s?v(?:iews?)?|pa/lat|pa and lat(?:eral)?"
        r"|portable|ap|pa))?: (?:neg|negative|nl|normal)\b",
        NF, fixed=PRESENT,
    ),
    _e(r"no (?:significant )?abnormalit(?:y|ies)(?! of)", NF, fixed=PRESENT),
    _e(r"nad\b", NF, fixed=PRESENT),  # British "no abnormality detected"
    # "Heart and lungs normal." states both; it must win over the heart-only phrases below
    _e(
        r"(?:the )?heart and lungs (?:are |appear |look )?(?:normal|unremarkable"
        r"|within normal limits)",
        C, O, fixed=ABSENT,
    ),
    # heart size: borderline first, then normal
    _e(
        r"(?:borderline|top[- ]normal|upper[- ]normal|high[- ]normal|prominent) "
        r"(?:cardiomegaly|enlarged heart|(?:heart|cardiac) (?:size|enlargement|silhouette)"
        r"|sized heart)",
        C, fixed=UNCERTAIN,
    ),
    Entry(
        _HEART + _GAP_NORMAL.replace(r"(?!not\b|", r"(?!not\b|normal\b|")
        + r"(?:borderline|(?:at )?(?:the )?upper (?:limits?|range|end) (?:of )?normal|top[- ]normal"
        r"|high[- ]normal|upper[- ]normal|prominent)".replace(" ", r"\s+"),
        (C,), UNCERTAIN,
    ),
    Entry(
        _HEART + _GAP_NORMAL.replace(r"(?!not\b|", r"(?!not\b|normal\b|")
        + r"(?:accentuated|exaggerated|magnified)\b",
        (C,), UNCERTAIN,
    ),
    Entry(
        _HEART + _GAP_NORMAL
        + r"(?:normal|nl|unremarkable|within\s+normal\s+limits|wnl"
        r"|not\s+(?:significantly\s+)?enlarged)\b",
        (C,), ABSENT,
    ),
    _e(
        r"(?:normal|nl)(?:[- ]sized?| size| (?:size|configuration|contours?|appearance)"
        r"(?: and (?:size|configuration|contours?|appearance))? of the)?"
        r" (?:heart(?: size)?|cardiac (?:silhouette|size|contours?)"
        r"|cardiothymic (?:silhouette|contours?)"
        rf"|{_CM} (?:silhouette|contours?|size))",
        C, fixed=ABSENT,
    ),
    # normal lungs: clear of opacity ("normal in volume" says nothing about opacity)
    _e(
        r"(?:lungs?|lung fields?) (?:are |is |appear |look )?(?:normal|unremarkable)\b"
        r"(?! in (?:volume|size|expansion|inflation))",
        O, fixed=ABSENT,
    ),
    # clear lungs (and pleural spaces)
    _e(
        r"(?:lungs?|lung fields?) and pleural (?:spaces?|surfaces?) (?:are |appear |remain )?clear"
        r"|clear (?:lungs?|lung fields?) and pleural (?:spaces?|surfaces?)",
        O, E, fixed=ABSENT,
    ),
    Entry(
        r"(?:lungs?|lung\s+fields?|lung\s+bases|lung\s+parenchyma)"
        r"(?:[\s:]+(?!not\b|no\b)[a-z/-]+){0,4}?[\s:]+clear\b(?!\s+of\b)",
        (O,), ABSENT,
    ),
    _e(r"clear (?:lungs?|lung fields?)", O, fixed=ABSENT),
    # "Lungs: Right basal atelectasis, otherwise clear.": the match is the subject alone (the
    # rest is a lookahead), so a finding named in between stays a mention of its own
    _e(r"(?:lungs?|lung fields?)\b(?=[^.;\n]{0,60}?, (?:but )?otherwise clear\b)", O, fixed=ABSENT),
    # sharp costophrenic angles
    _e(
        r"(?:costophrenic|cp) (?:angles?|sulci|sulcus|recesses) (?:are |is |remain )?"
        r"(?:sharp(?:ly defined)?|clear|free|preserved|normal)",
        E, fixed=ABSENT,
    ),
    _e(r"sharp (?:costophrenic|cp) (?:angles?|sulci)", E, fixed=ABSENT),
    _e(r"pleural spaces?:? (?:are |is )?clear", E, fixed=ABSENT),
    _e(
        r"no pleural abnormalit(?:y|ies)|(?:pleura|pleural spaces?):? (?:is |are |appear )?"
        r"(?:normal|unremarkable)",
        E, fixed=ABSENT,
    ),
)

# Single terms; their status comes from negation and hedging. Longer alternatives come first,
# so "pericardial effusion" and "calcified nodule" win over "effusion" and "nodule".
DEVICE_TERMS = frozenset(
    {
        "endotracheal_tube",
        "enteric_tube",
        "central_line",
        "pacemaker",
        "sternotomy",
        "chest_tube",
        "tracheostomy",
        "surgical_clips",
        "support_devices",
        "valve_prosthesis",
    }
)
#: Unmapped terms that do not spoil an inferred normal study (hardware, age-related change, a
#: healed calcified granuloma: the CheXpert convention, and how real normal reports read).
INCIDENTAL_TERMS = DEVICE_TERMS | {
    "degenerative_change", "aortic_atherosclerosis", "post_surgical", "granuloma"
}

TERMS: tuple[Entry, ...] = (
    # outside the label space: specific multi-word phrases first
    _e(r"pericardial effusions?", "pericardial_effusion"),
    _e(r"(?:subcutaneous|soft tissue|soft-tissue) (?:emphysema|air|gas)", "subcutaneous_emphysema"),
    _e(r"(?:interstitial|alveolar|pulmonary) edema|edema", "edema"),
    _e(
        r"(?:pulmonary )?(?:vascular|venous) (?:congestion|engorgement|redistribution)"
        r"|cephalization|fluid overload",
        "edema",
    ),
    _e(r"congestive heart failure|\bchf\b", "heart_failure"),
    _e(
        # an interstitial *opacity* or *infiltrate* is a lung opacity (the term entry below)
        r"interstitial (?:markings?|prominence|lung disease|abnormalit(?:y|ies)"
        r"|thickening|pattern|changes?|process|disease)"
        r"|reticul(?:ar|onodular) (?:opacit(?:y|ies)|markings?|pattern|changes?)|\bild\b",
        "interstitial_abnormality",
    ),
    _e(
        r"(?:calcified|granulomatous) (?:nodules?|granulomas?|lymph nodes?|densit(?:y|ies)|foci"
        r"|focus)|granulomas?|granulomatous (?:disease|changes?)",
        "granuloma",
    ),
    _e(r"nipple (?:shadows?|markers?)", "nipple_shadow"),
    _e(
        r"(?:lytic|sclerotic|blastic|osseous|bony|bone|skeletal) (?:lesions?|metastas(?:is|es)"
        r"|abnormalit(?:y|ies)|destruction)",
        "osseous_lesion",
    ),
    _e(r"(?:breast|prostate|colon|renal) (?:cancer|carcinoma|masse?s?)", "extrathoracic_cancer"),
    _e(r"atelecta(?:sis|ses|tic)|(?:lobar |lobe |segmental |subsegmental )?collapse|volume loss",
       "atelectasis"),
    _e(r"pleural (?:thickening|plaques?|calcifications?)", "pleural_thickening"),
    _e(r"scar(?:s|ring)?|(?:post-?radiation |radiation )?fibrosis|fibrotic|cicatricial", "scarring"),
    _e(r"fractures?|\bfx\b", "fracture"),
    _e(
        r"emphysema(?:tous)?(?: changes?)?|hyperinfla(?:tion|ted)|hyperexpan(?:sion|ded)|\bcopd\b"
        r"|chronic obstructive pulmonary disease|bullae|bullous",
        "emphysema",
    ),
    _e(r"(?:(?:hiatal|hiatus|diaphragmatic|paraesophageal) )?hernias?", "hernia"),
    _e(
        r"(?:widened|widening of the|wide) (?:superior )?mediastinum|mediastinal widening"
        r"|mediastinum (?:is |appears )?(?:mildly |slightly )?(?:widened|wide)",
        "mediastinal_widening",
    ),
    _e(r"pneumomediastinum", "pneumomediastinum"),
    _e(r"pneumoperitoneum|free (?:intraperitoneal |subdiaphragmatic )?air", "pneumoperitoneum"),
    _e(
        r"(?:hilar|mediastinal) (?:enlargement|adenopathy|lymphadenopathy|fullness|prominence)"
        r"|lymphadenopathy|adenopathy",
        "lymphadenopathy",
    ),
    _e(
        r"peribronchial (?:thickening|cuffing)|bronchial wall thickening|bronchiectasis"
        r"|bronchitis|airways? disease|air trapping|hyperlucen(?:cy|t)",
        "airway_disease",
    ),
    _e(
        r"elevat(?:ed|ion of the) (?:(?:left|right) )?hemidiaphragm"
        r"|hemidiaphragm (?:is |remains )?(?:mildly |moderately )?elevated",
        "elevated_hemidiaphragm",
    ),
    _e(
        r"degenerative (?:changes?|disease)|spondylo(?:sis|tic changes?)|osteophytes?"
        r"|(?:dextro|levo)?scoliosis|kyphosis",
        "degenerative_change",
    ),
    _e(
        r"(?:aortic|vascular|atherosclerotic) calcifications?|atherosclero(?:sis|tic)"
        r"|tortuous (?:thoracic )?aorta|tortuosity of the (?:thoracic )?aorta"
        r"|aortic (?:tortuosity|ectasia|unfolding)|unfolded aorta"
        r"|aorta is (?:tortuous|calcified|unfolded|ectatic)"
        r"|(?:unfolding|tortuosity|calcification) of the (?:thoracic )?aorta",
        "aortic_atherosclerosis",
    ),
    # devices, lines, tubes, surgery
    _e(r"endotracheal tubes?|\bet tubes?|\betts?\b", "endotracheal_tube"),
    _e(
        r"(?:nasogastric|orogastric|\bng|\bog|enteric|feeding|dobb?hoff|nasoenteric|gastric) tubes?",
        "enteric_tube",
    ),
    _e(
        r"(?:central venous|central|picc|\bij|internal jugular|subclavian|swan[- ]ganz"
        r"|pulmonary artery|dialysis|hemodialysis|tunnell?ed)(?: venous)? (?:lines?|catheters?)"
        r"|\bpiccs?\b|port-?a-?cath|(?:chest|power|mediport) ports?|\bcvc\b",
        "central_line",
    ),
    _e(
        r"pacemakers?|\bpacer\b|\b(?:a?icd)\b|defibrillators?|(?:cardiac|pacer|pacemaker) leads?"
        r"|loop recorder",
        "pacemaker",
    ),
    _e(
        r"(?:median )?sternotomy(?: wires)?|sternal (?:wires|sutures)|\bcabg\b"
        r"|coronary artery bypass(?: graft(?:ing)?)?",
        "sternotomy",
    ),
    _e(
        r"chest tubes?|thoracostomy tubes?|pleural (?:drains?|catheters?)"
        r"|pigtail (?:catheters?|drains?)",
        "chest_tube",
    ),
    _e(r"tracheostomy(?: tubes?)?|trach tubes?", "tracheostomy"),
    _e(r"(?:surgical|vascular|cholecystectomy|mediastinal|axillary) clips?", "surgical_clips"),
    _e(r"(?:prosthetic|mechanical) (?:aortic |mitral )?valves?|valve replacement", "valve_prosthesis"),
    _e(r"lines and tubes|tubes and lines|support devices?|monitoring (?:leads|devices)",
       "support_devices"),
    _e(
        r"post-?surgical changes?|post-?operative changes?|(?:upper |lower |middle )?lobectom(?:y|ies)"
        r"|(?:post-?)?pneumonectomy|post-?radiation changes?|radiation changes?"
        r"|mastectomy|thoracotomy",
        "post_surgical",
    ),
    # pleural effusion
    _e(r"hydropneumothora(?:x|ces)", E, P),
    _e(
        r"(?:pleural )?eff?uss?ions?|(?:pleural )?effs?\b|pleural fluid|hydrothorax|layering fluid"
        r"|fissural fluid"
        r"|fluid (?:(?:is )?(?:noted |seen |present |tracking )?)?(?:(?:with)?in|along|into) the "
        r"(?:(?:right|left) )?"
        r"(?:minor|major|horizontal|oblique) fissure",
        E,
    ),
    _e(
        r"blunt(?:ing|ed) (?:of )?(?:the )?(?:(?:left|right|bilateral|both|posterior) )*"
        r"(?:costophrenic|cp) (?:angles?|sulci|sulcus|recesses)"
        r"|(?:costophrenic|cp) (?:angle |sulcus )?blunting"
        r"|(?:costophrenic|cp) (?:angles?|sulci|sulcus) (?:is |are )?(?:mildly |slightly )?blunted"
        r"|meniscus(?: sign)?",
        E, indirect=True,
    ),
    # pneumothorax
    _e(r"(?:pneumo|numo|pnuemo)[ -]?th?ora(?:x|ces)|pneumothroax|\bptx\b", P),
    # lung opacity / consolidation
    _e(
        r"(?:(?:airspace|air-space|air space|alveolar|parenchymal) (?:opacit(?:y|ies)|disease"
        r"|process|consolidations?|opacification))|consolidat(?:ion|ions|ive (?:opacit(?:y|ies)"
        r"|process|changes?))|consolodations?|ground[- ]glass(?: opacit(?:y|ies))?|opacit(?:y|ies)"
        r"|opacification"
        r"|infiltrat(?:e|es|ion|ive)|(?:broncho)?pneumonias?|pna\b|pneumonitis|haziness"
        r"|(?:(?:airspace|air-space|air space|alveolar) )?shadowing"
        r"|(?:lung |pulmonary )?parenchymal abnormalit(?:y|ies)"
        # a "density" only where its site is the lung: alone it is as often a hernia, a
        # stent, a skin fold or a bone
        r"|(?:(?:airspace|air-space|air space|alveolar|parenchymal|lung|pulmonary|basilar"
        r"|(?:lung )?base|retrocardiac|perihilar|infrahilar|suprahilar|patchy|hazy|streaky"
        r"|ill-defined|confluent) )densit(?:y|ies)",
        O,
    ),
    # A nodule or mass at a site outside the lung (bone, chest wall, breast, thyroid, abdomen):
    # named before it ("chest wall mass") or after it ("lesion of the right 9th rib", "lesion
    # ... in the humeral head"). A landmark it only projects over ("nodule projecting over the
    # 4th rib") is not its site.
    _e(
        r"(?:chest wall|breast|thyroid|soft[- ]tissue|bone|bony|osseous|rib|skin|cutaneous"
        r"|subcutaneous|axillary|neck|liver|hepatic|renal|adrenal|abdominal|splenic|spinal"
        r"|vertebral) (?:nodules?|masse?s?|lesions?|tumou?rs?)",
        "extrapulmonary_lesion",
    ),
    Entry(
        r"(?:nodules?|masse?s?|lesions?)(?=(?:\s+[\w-]+){0,5}?\s+(?:of|in|within|involving|at)"
        r"\s+the(?:\s+[\w-]+){0,3}?\s+(?:ribs?|humer(?:us|al)|clavic(?:le|ular)|scapula"
        r"|vertebr(?:a|ae|al)|spine|sternum|breast|chest\s+wall|shoulder|thyroid|neck|liver"
        r"|abdomen|kidneys?|spleen|soft\s+tissues?)\b)",
        ("extrapulmonary_lesion",),
    ),
    # A nodular or round opacity is a nodule described by its shape (the image label that marks
    # it is nodule/mass, not opacity): a nodule on its own ("1.5 cm nodular opacity"), deferring
    # to an explicit nodule in its clause ("nodular opacity which could represent a nodule").
    _e(
        r"(?:nodular|rounded|round|circular|spherical|nodule-like) (?:opacit(?:y|ies)"
        r"|densit(?:y|ies))",
        N, shape=True,
    ),
    # nodule / mass
    _e(
        r"nodules?|mass(?:es)?(?! effect|-like| like)|lesions?|tumou?rs?|neoplasms?|carcinomas?|carcinoid"
        r"|(?:lung )?cancer|malignanc(?:y|ies)|metastas(?:is|es)|metastatic (?:disease|lesions?)",
        N,
    ),
    # cardiomegaly. A wide cardiomediastinal silhouette is only a sign of it (the mediastinum or
    # a pericardial effusion may be the cause), so it defers to an explicit hedged cardiomegaly.
    _e(
        rf"(?:enlarged|enlargement of the) {_CM} "
        r"(?:silhouette|contours?)",
        C, indirect=True,
    ),
    Entry(
        _CM + r"\s+(?:silhouette|contours?)" + _GAP_ENLARGED + r"enlarged\b",
        (C,), indirect=True,
    ),
    _e(
        r"cardiomegall?y|enlarged (?:heart|cardiac (?:silhouette|shadow|size))|cardiac enlargement"
        r"|enlargement of the (?:heart|cardiac (?:silhouette|shadow))"
        r"|(?:increased|enlarged) cardiothoracic ratio",
        C,
    ),
    Entry(_HEART + _GAP_ENLARGED + r"(?:enlarged|increased|large)\b", (C,)),
    # "interval increase in heart size" ("no increase in heart size" is denied: the change word
    # opens the mention, see the pseudo-negation rule)
    _e(
        r"(?:increase|enlargement) (?:in|of) (?:the )?(?:heart size|size of the heart"
        r"|cardiac (?:size|silhouette))|(?:increased|increasing|enlarging) (?:heart size"
        r"|cardiac (?:size|silhouette))",
        C,
    ),
)


class Trig(Enum):
    """Trigger kinds.

    PRE_* look forward from the trigger, POST_* look back; BI_* look back when a mention sits
    right before them, forward otherwise. ARTEFACT is a backward hedge that explains the finding
    away ("likely a nipple shadow"): an explicit denial in the same section outranks it.
    UNASSESSED looks back and, like INDICATION, drops what it covers ("X cannot be assessed"). PSEUDO triggers assert nothing: they only keep "no" in
    "no change in" from reading as a denial. HISTORY and INDICATION mark mentions that are not
    findings of this study ("history of", "evaluate for").
    """

    PRE_NEG = "pre_neg"
    POST_NEG = "post_neg"
    BI_NEG = "bi_neg"
    PRE_HEDGE = "pre_hedge"
    POST_HEDGE = "post_hedge"
    BI_HEDGE = "bi_hedge"
    ARTEFACT = "artefact"
    UNASSESSED = "unassessed"
    PSEUDO = "pseudo"
    HISTORY = "history"
    INDICATION = "indication"
    TERMINATOR = "terminator"


# After "X is likely": what may follow and still leave X itself hedged ("is likely present",
# "is likely given the history"). Any other word names X's cause ("is likely scarring").
_NO_CAUSE_FOLLOWS = (
    r"(?![ \t\r\n]+(?!(?:present|seen|noted|identified|visible|given|in|on|at|with|based|and"
    r"|or|but|although|though|if)\b)[a-z])"
)

_VIEWED = (
    r"(?:seen|identified|visualized|visualised|demonstrated|evident|present|appreciated|noted"
    r"|detected|visible|apparent|shown|definitely seen|clearly seen|observed)"
)

# Order matters where two alternatives start at the same place: the first listed wins.
TRIGGERS: tuple[tuple[str, Trig], ...] = (
    # pseudo-negation and partial change (the finding is still there)
    (r"not only", Trig.PSEUDO),
    # a recommendation, not an indication: "Recommend CT follow-up of the nodule"
    (
        r"recommend(?:s|ed|ation)?(?: (?:a|an|the))?(?: (?:ct|chest ct|imaging|radiographic"
        r"|short-term|interval|further))? follow-?up (?:of|for)",
        Trig.PSEUDO,
    ),
    # "not seen on the prior study": new, not denied
    (
        rf"(?:(?:is|are|was|were) )?not (?:previously {_VIEWED}|{_VIEWED} (?:on|in) (?:the )?"
        r"(?:prior|previous|earlier|older|comparison|initial|original|frontal|lateral|pa|ap"
        r"|portable|same-day|other)\b)",
        Trig.PSEUDO,
    ),
    (
        r"(?:no|without) (?:(?:significant|appreciable|substantial|definite|interval|significant "
        r"interval|further|marked|notable) )?(?:change|changes|increase|decrease|worsening"
        r"|progression|enlargement|growth|improvement|reduction)",
        Trig.PSEUDO,
    ),
    (r"(?:(?:has|have) )?not (?:significantly |substantially )?(?:changed|increased|decreased"
     r"|worsened|improved|progressed)", Trig.PSEUDO),
    (
        r"(?:partial(?:ly)?|incomplete(?:ly)?|near(?:ly)?(?:-| )?complete(?:ly)?"
        r"|almost(?: complete(?:ly)?)?|largely|mostly|nearly|not(?: yet)?(?: (?:completely"
        r"|entirely|fully))?) resol(?:ved|ution|ving)|resolving|improving|improved|decreas(?:ed|ing)"
        r"|unchanged|residual",
        Trig.PSEUDO,
    ),
    # hedges that contain a negation word: before the plain negations
    (
        r"(?:cannot|can not|can't|can’t|could not|couldn't|not) (?:be )?(?:entirely |completely "
        r"|definitely |totally |fully )?(?:excluded|ruled out)",
        Trig.POST_HEDGE,
    ),
    (r"(?:is|are) (?:difficult|hard) to (?:entirely |completely )?(?:exclude|rule out)",
     Trig.POST_HEDGE),
    (r"(?:cannot|can not|can't|can’t|could not) (?:entirely |completely |definitely )?"
     r"(?:exclude|rule out|r/o)|not exclude", Trig.PRE_HEDGE),
    # "infiltrates difficult to exclude" looks back, "difficult to exclude infiltrates" forward
    (r"(?:difficult|hard) to (?:entirely |completely )?(?:exclude|rule out)", Trig.BI_HEDGE),
    # comparative likelihood: what follows "than" is the less likely option
    (r"(?:more|less) likely than", Trig.PRE_HEDGE),
    (r"(?:(?:is|are) )?(?:much )?less likely", Trig.POST_HEDGE),
    # indication / history: not a finding of this study
    (
        r"to (?:document|ensure|confirm|assess|evaluate|evaluate for|assess for|demonstrate) "
        r"(?:complete )?(?:resolution|clearing|stability)",
        Trig.INDICATION,
    ),
    (
        r"(?:evaluat(?:e|ion) (?:for|of)|eval (?:for|of)|assess(?:ment)? (?:for|of)|rule out"
        r"|to rule out|\br/o|to exclude|check for|query|to evaluate|for (?:further )?evaluation of"
        r"|follow-?up (?:of|for)|\bf/u\b"
        # what another test could show, or what may be hidden: nothing is stated about this image
        r"|(?:to|in|for) (?:detect(?:ing|ion of)?|identify(?:ing)?|characteriz(?:e|ing|ation of))"
        r"|(?:could|may|might|can) (?:obscure|hide|mask))",
        Trig.INDICATION,
    ),
    (r"(?:history of|\bhx of|\bh/o|status post|\bs/p\b|\bpmh\b|past medical history of)",
     Trig.HISTORY),
    # negations that follow their finding
    (rf"(?:(?:is|are|was|were|has been|have been) )?(?:not|no longer) {_VIEWED}", Trig.POST_NEG),
    (r"(?:is|are|was|were) (?:now )?(?:absent|gone)|(?:is|are) no longer present", Trig.POST_NEG),
    # "Pneumothorax: absent." (structured reports) as well as "absent costophrenic blunting"
    (r"\babsent\b", Trig.BI_NEG),
    (r"(?:(?:has|have|had) )?(?:(?:now|since|completely|entirely|fully) )?(?:resolved|cleared)"
     r"|(?:has|have) been (?:removed|resolved)|removed", Trig.BI_NEG),
    (r"none(?: (?:seen|identified|present|noted))?|ruled out|excluded", Trig.POST_NEG),
    # "pneumothorax cannot be assessed": the finding was not evaluated, nothing is claimed
    (
        r"(?:cannot|can not|can't|can’t|could not) be (?:accurately |reliably |adequately "
        r"|well |fully )?(?:assessed|evaluated)|(?:is|are) not (?:assessable|evaluable)",
        Trig.UNASSESSED,
    ),
    # hedges that follow their finding
    (
        r"(?:(?:is|are|was|were) )?(?:(?:most )?likely |probably |possibly )?(?:represent(?:s|ed)?"
        r"|representing|reflect(?:s|ed)?|(?:may|could|might) (?:represent|reflect|be)|due to|related to"
        r"|secondary to|attributable to|caused by|(?:most )?consistent with"
        r"|favou?r(?:ed|ing)?|likely|probably|possibly) (?:an? |the )?(?:nipple shadows?"
        r"|overlapping|overlap|overlying|summation|skin folds?|artifact|artefact"
        r"|vascular shadows?|end-on vessels?|(?:breast|soft) tissues?|external objects?)",
        Trig.ARTEFACT,
    ),
    (
        r"(?:is|are|was|were) (?:also |again )?(?:possible|possibly present|suspected|questioned"
        r"|a (?:consideration|possibility)|considered|likely|probable|favou?red|not excluded)"
        # "The opacity is likely scarring": a named cause follows, and only the cause is hedged.
        + _NO_CAUSE_FOLLOWS + r"|(?:may|might|could) (?:also )?be (?:present|obscured|hidden|masked)"
        r"|unlikely"
        r"|(?:(?:may|might|could) be|(?:is|are) (?:likely|probably|possibly|partly|partially)"
        r"|possibly|probably|likely|partly|partially|perhaps)"
        r" (?:partly |partially )?(?:accentuated|exaggerated|magnified|overestimated)"
        # "Small effusions likely.": a hedge word that closes the sentence looks back
        r"|(?:likely|probable|possible|suspected|questionable)(?=[ \t]*[.!;]?[ \t\r\n]*\Z)",
        Trig.POST_HEDGE,
    ),
    # "enlarged but this may be exaggerated by the AP projection": the "but" only introduces
    # the hedge of what comes before it, so this is matched before the terminators
    (
        r"(?:but|although|though|however)(?:,)? (?:(?:this|it|which|that|the latter) )?"
        r"(?:(?:may|might|could) (?:also )?be|is (?:likely|probably|possibly|partly|partially))"
        r" (?:partly |partially )?(?:accentuated|exaggerated|magnified|overestimated)",
        Trig.POST_HEDGE,
    ),
    (
        r"(?:(?:is|are) )?(?:not (?:well|clearly|definitely)|poorly|less well) (?:seen|visualized"
        r"|visualised|demonstrated|evaluated|identified)",
        Trig.POST_HEDGE,
    ),
    # hedges that precede their finding
    (
        r"possibl[ey]|probabl[ey]|(?:most |more )?likely|questionabl[ey]|question of|questioned"
        r"|\bquestion\b"
        r"|suspicious (?:for|of)|suspicion (?:of|for)|suspected|suspect|concerning for|concern for"
        r"|worrisome for|worrisome|\bc/f\b|(?:may|might|could) (?:represent|reflect|indicate|be|have"
        r"|relate to|correspond to|also represent|be due to)|differential (?:diagnosis )?"
        r"(?:includes?|considerations? includes?|would include)|equivocal|suggestive of"
        r"|suggest(?:s|ing)?|presum(?:ed|ably)|cannot be distinguished from|indistinguishable from"
        r"|\bmay\b|\bpotential\b",
        Trig.PRE_HEDGE,
    ),
    (r"versus|\bvs\b\.?", Trig.BI_HEDGE),
    # negations that precede their finding
    (
        r"no evidence of|no radiographic evidence of|no signs? of|negative for|free of"
        r"|absence of|resolution of|clearing of|removal of|clear of|without|\bw/o\b|\bno\b"
        r"|\bnot\b|\bnor\b"
        r"|\bneither\b",
        Trig.PRE_NEG,
    ),
    # scope terminators
    (
        r"\bbut\b|however|although|\bthough\b|except|apart from|aside from|other than"
        r"|with the exception of|whereas|\bwhile\b|\byet\b"
        r"|\b(?:and|with) (?=(?:small|moderate|large|mild|trace|tiny|minimal|new|increased"
        r"|persistent|stable|unchanged|there|the|an?|now|interval)\b)"
        # only as the subject of its own verb and not after a preposition, so "nodule seen in
        # the right lung is no longer visible" and "opacity over the left lung base is ..." stay
        # one clause (the lookbehinds bracket their space: rx() would make a bare one
        # variable-width)
        r"|(?<!of[ ])(?<!in[ ])(?<!at[ ])(?<!to[ ])(?<!on[ ])(?<!by[ ])(?<!over[ ])(?<!from[ ])"
        r"(?<!with[ ])(?<!into[ ])(?<!within[ ])"
        r"\bthe (?=(?:heart|lungs?|cardiac silhouette|cardiomediastinal silhouette|mediastinum"
        r"|(?:right|left) lung) (?:is|are|appears?|remains?|was|were|looks?|size)\b)",
        Trig.TERMINATOR,
    ),
)
#: Triggers that are punctuation, not words ("? pneumonia", "no effusion; small ptx").
PUNCT_TRIGGERS: tuple[tuple[str, Trig], ...] = (
    (r"\?(?=[a-z])|\+/-|\+/\u2212", Trig.PRE_HEDGE),  # "?nodule", "consolidation +/- effusion"
    (r"\?", Trig.BI_HEDGE),
    (r":[ \t]*no(?=[ \t]*(?:[.,;]|\r?\n|\Z))", Trig.POST_NEG),  # "Pneumothorax: No."
    (r";|\s-{1,2}\s", Trig.TERMINATOR),
)

class SectionKind(Enum):
    """How much a report section counts; IGNORE sections hold no findings of this study."""

    IGNORE = 0
    FINDINGS = 1
    IMPRESSION = 2
    ADDENDUM = 3


_SECTION_WORDS: tuple[tuple[str, SectionKind], ...] = (
    (r"addendum", SectionKind.ADDENDUM),
    (
        r"findings?(?: and impressions?|/impressions?)|impressions?|conclusions?|summary|opinion"
        r"|diagnosis|interpretation",
        SectionKind.IMPRESSION,
    ),
    (r"findings?|report|recommendations?|notification|results?", SectionKind.FINDINGS),
    (
        r"indications?|\bhx|clinical (?:indications?|history|information|data|notes?|question"
        r"|details)|(?:brief )?history|reason for (?:exam(?:ination)?|study|request|referral)"
        r"|reason",
        SectionKind.IGNORE,
    ),
    # one-line sections: they end where a new capitalised line starts (see LINE_SECTIONS)
    (
        r"comparisons?|technique|examination|exam|procedure|views?|type of "
        r"(?:exam(?:ination)?|study)|prior(?: studies| study| exams?)?",
        SectionKind.IGNORE,
    ),
)

_SECTION_ALT = "|".join(f"(?P<s{i}>{rx(p)})" for i, (p, _) in enumerate(_SECTION_WORDS))
SECTION_KINDS = {f"s{i}": kind for i, (_, kind) in enumerate(_SECTION_WORDS)}
#: Header groups of sections that hold one line (COMPARISON, TECHNIQUE, ...): unlike a free-text
#: indication, such a section ends at a line that starts a new capitalised sentence.
LINE_SECTIONS = frozenset({f"s{len(_SECTION_WORDS) - 1}"})

#: A header: at the start, after a line break or a sentence end, then a colon, or alone on its line.
HEADER_RE = re.compile(
    r"(?:\A|(?<=[\n.?!;]))[ \t]*(?:[#*_]+[ \t]*)?(?:" + _SECTION_ALT + r")[ \t]*[*_#]*[ \t]*"
    r"(?::|(?=[ \t]*(?:\r?\n|\Z)))",
)

LATERALITY_RE = re.compile(
    r"\b(?:left|right|bilateral(?:ly)?|both|bibasilar|bibasal|biapical|bilat|rul|rml|rll|lul|lll"
    r"|lingula(?:r)?)\b"
    r"|(?<![\w/])[lr](?![\w/])"
)


class Alternation:
    """Many patterns scanned as one alternation; each hit reports which pattern matched.

    The scan regex has no capture groups (a group per alternative costs the engine a mark per
    alternative at every position, about twice the time), and one word-start test in front
    rather than a word boundary per alternative, so a position inside or at the end of a word
    is given up once. Which pattern matched is found afterwards, at the few hits, by trying the
    patterns in order at the hit, exactly as the alternation did. Patterns are indexed by the
    characters they can start with (:func:`_first_chars`), for the scan and for that lookup.
    """

    def __init__(self, words: Sequence[str], punct: Sequence[str] = (), tail: str = "") -> None:
        self.parts = tuple(
            [re.compile(f"(?:{p}){tail}") for p in words] + [re.compile(p) for p in punct]
        )
        starts = [_first_chars(part.pattern) for part in self.parts]
        # The scan groups the word patterns by the letter they can start with, each group
        # behind a one-letter lookahead and in the original order, so at a word start the
        # engine tries the few patterns that can start there instead of all of them (same hits
        # in the same order; a test compares them).
        firsts = starts[: len(words)]
        letters = "abcdefghijklmnopqrstuvwxyz"
        if all(f is not None for f in firsts):
            letters = "".join(c for c in letters if any(f is not None and c in f for f in firsts))
        groups = [
            f"(?={c})(?:" + "|".join(w for w, f in zip(words, firsts, strict=True)
                                    if f is None or c in f) + ")"
            for c in letters
        ]
        scan = r"(?<!\w)(?=[a-z])(?:" + "|".join(groups) + ")" + tail
        self.scan = re.compile("|".join([scan, *punct]))
        # At a hit, likewise only the patterns that can start with its first character are
        # tried, in order, to learn which one matched.
        chars = set().union(*(f for f in starts if f is not None))
        self._by_char = {
            c: tuple(i for i, f in enumerate(starts) if f is None or c in f) for c in chars
        }
        self._any = tuple(i for i, f in enumerate(starts) if f is None)

    def finditer(self, text: str, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(pattern index, start, end)`` of each hit in ``text[start:end]``."""
        parts, by_char, any_char = self.parts, self._by_char, self._any
        for m in self.scan.finditer(text, start, end):
            at = m.start()
            for index in by_char.get(text[at], any_char):
                if parts[index].match(text, at, end) is not None:
                    yield index, at, m.end()
                    break


def _first_chars(pattern: str) -> frozenset[str] | None:
    """The characters a match of ``pattern`` can start with, or None when that is not a small
    known set (a class such as ``\\w``, or a pattern that can match the empty string)."""
    first, nullable = _seq_first(_sre_parser.parse(pattern))
    return None if first is None or nullable else frozenset(first)


def _seq_first(items: Iterable[tuple[object, object]]) -> tuple[set[str] | None, bool]:
    out: set[str] = set()
    for op, av in items:
        first, nullable = _item_first(op, av)
        if first is None:
            return None, False
        out |= first
        if not nullable:
            return out, False
    return out, True


def _item_first(op: object, av: Any) -> tuple[set[str] | None, bool]:
    """First characters of one parsed item and whether it can match nothing."""
    if op is _sre.LITERAL:
        return {chr(av)}, False
    if op is _sre.IN:
        chars: set[str] = set()
        for kind, arg in av:
            if kind is _sre.LITERAL:
                chars.add(chr(arg))
            elif kind is _sre.RANGE:
                chars.update(chr(c) for c in range(arg[0], arg[1] + 1))
            else:
                return None, False
        return chars, False
    if op is _sre.SUBPATTERN:
        return _seq_first(av[3])
    if op is _sre.BRANCH:
        union: set[str] = set()
        any_empty = False
        for branch in av[1]:
            first, nullable = _seq_first(branch)
            if first is None:
                return None, False
            union |= first
            any_empty |= nullable
        return union, any_empty
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
        low, _, sub = av
        first, nullable = _seq_first(sub)
        return (None, False) if first is None else (first, nullable or low == 0)
    if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
        return set(), True  # zero-width: the next item decides
    return None, False


PHRASE_ALT = Alternation([e.pattern for e in PHRASES])
TERM_ALT = Alternation([e.pattern for e in TERMS], tail=r"\b")
TRIGGER_ALT = Alternation([rx(p) for p, _ in TRIGGERS], [p for p, _ in PUNCT_TRIGGERS])
TRIGGER_KINDS = tuple(kind for _, kind in TRIGGERS + PUNCT_TRIGGERS)
