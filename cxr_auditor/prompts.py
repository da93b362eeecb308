"""Pinned prompt texts, with a content hash for provenance.

Every prompt is a constant: a result records :func:`prompt_hash` of the text it used, so a
changed prompt shows up as a changed hash in ``AuditResult.models``. Profiles name a prompt by
its key in :data:`PROMPTS`.

The grounding prompt asks for ``{label, box_2d}`` only, the keys the fine-tuned models were
trained to emit. Its example keeps radiographic laterality right: on a PA or AP view displayed
in the standard way, the image's left half is the patient's RIGHT side.
"""

from __future__ import annotations

import hashlib
import json

from cxr_auditor.errors import DraftInputError
from cxr_auditor.labels import LABELS

__all__ = [
    "CORRECTIVE_SUFFIX",
    "DRAFT_PARSING_PROMPT_TEMPLATE",
    "DRAFT_PLACEHOLDER",
    "DSA_PATENCY_PROMPT",
    "EXPLAIN_MY_XRAY_PROMPT",
    "GROUNDING_EXAMPLES",
    "GROUNDING_PROMPT",
    "PROMPTS",
    "build_draft_prompt",
    "prompt_hash",
]

_LABEL_LIST = ", ".join(LABELS)

#: (what the example shows, the exact answer) pairs embedded in :data:`GROUNDING_PROMPT`; a test
#: checks each answer's box sits on the side its description names.
GROUNDING_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "a PA view with a RIGHT pleural effusion (patient's right, so the LEFT half of the image)",
        json.dumps([{"label": "pleural_effusion", "box_2d": [0.58, 0.06, 0.93, 0.42]}]),
    ),
    (
        "a PA view with a LEFT apical pneumothorax "
        "(patient's left, so the RIGHT half of the image)",
        json.dumps([{"label": "pneumothorax", "box_2d": [0.05, 0.56, 0.38, 0.92]}]),
    ),
    (
        "a normal PA view",
        json.dumps([{"label": "no_finding", "box_2d": None}]),
    ),
)

GROUNDING_PROMPT = (
    "You are a finding extractor for a research quality-assurance tool. This is not diagnosis "
    "and not for clinical use.\n"
    "Look at the chest X-ray and list the findings you can see. Use only these labels, spelled "
    f"exactly as written: {_LABEL_LIST}.\n"
    "Answer with a JSON list of objects with two keys:\n"
    '- "label": one of the labels above;\n'
    '- "box_2d": [y0, x0, y1, x1], the region of the finding as fractions of the image in '
    "[0, 1]; (y0, x0) is the top-left corner and (y1, x1) the bottom-right; y is measured down "
    "from the top edge, x across from the left edge of the image; use null when the finding "
    "has no single location.\n"
    "Boxes are in image coordinates: on a standard PA or AP view the patient's right side is "
    "on the LEFT of the image.\n"
    'If nothing is abnormal, answer with exactly one element, {"label": "no_finding", '
    '"box_2d": null}, and never combine no_finding with another label.\n'
    "Print only the JSON list: no prose, no markdown.\n"
    "Examples:\n"
    + "".join(f"{desc}: {answer}\n" for desc, answer in GROUNDING_EXAMPLES)
)

#: Where the draft goes in :data:`DRAFT_PARSING_PROMPT_TEMPLATE`; filled by plain replacement,
#: so braces in a draft are safe.
DRAFT_PLACEHOLDER = "{draft}"

DRAFT_PARSING_PROMPT_TEMPLATE = (
    "You read radiology report drafts for a research quality-assurance tool. This is not "
    "diagnosis and not for clinical use.\n"
    "From the chest X-ray draft below, list every statement about these findings: "
    f"{_LABEL_LIST}.\n"
    "Answer with a JSON list of objects with three keys:\n"
    '- "label": one of the labels above, spelled exactly;\n'
    '- "status": "present" when the draft asserts the finding, "absent" when it explicitly '
    'rules it out (e.g. "no pneumothorax"), "uncertain" when it hedges (e.g. "may '
    'represent", "cannot exclude", "possible");\n'
    '- "span": the words of the draft that make the statement, copied character for '
    "character, including any side (left, right, bilateral).\n"
    "Leave out findings the draft does not mention. Do not map other findings (atelectasis, "
    "fracture, lines, tubes) onto these labels. A draft that calls the study normal gives "
    '{"label": "no_finding", "status": "present"} with its span. "Heart size is normal" '
    "rules out cardiomegaly.\n"
    "Print only the JSON list: no prose, no markdown.\n"
    "Example draft: Small left pleural effusion. Possible right basal consolidation. "
    "No pneumothorax.\n"
    "Example answer: "
    + json.dumps(
        [
            {
                "label": "pleural_effusion",
                "status": "present",
                "span": "Small left pleural effusion",
            },
            {
                "label": "lung_opacity_consolidation",
                "status": "uncertain",
                "span": "Possible right basal consolidation",
            },
            {"label": "pneumothorax", "status": "absent", "span": "No pneumothorax"},
        ]
    )
    + "\n\nDraft:\n"
    + DRAFT_PLACEHOLDER
)

CORRECTIVE_SUFFIX = (
    "\n\nYour previous answer could not be read as one JSON list. Answer again with a single "
    "complete JSON list that starts with [ and ends with ], each element listed once, and "
    "nothing before or after it."
)

#: The explain-my-xray adapter was trained on this exact instruction; do not reword it.
EXPLAIN_MY_XRAY_PROMPT = "Locate abnormalities."

DSA_PATENCY_PROMPT = (
    "This is a digital subtraction angiography image. Is the imaged vessel patent or blocked? "
    "Answer with exactly one word: patent or blocked."
)


def build_draft_prompt(draft: str) -> str:
    """The draft-parsing prompt with ``draft`` (trimmed) placed last.

    Raises:
        DraftInputError: the draft is empty or only whitespace.
    """
    text = draft.strip()
    if not text:
        raise DraftInputError("draft text is empty")
    return DRAFT_PARSING_PROMPT_TEMPLATE.replace(DRAFT_PLACEHOLDER, text)


def prompt_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text`` (UTF-8): the prompt's provenance id."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


#: Prompts a profile may name.
PROMPTS: dict[str, str] = {
    "grounding": GROUNDING_PROMPT,
    "draft_parsing": DRAFT_PARSING_PROMPT_TEMPLATE,
    "explain_my_xray": EXPLAIN_MY_XRAY_PROMPT,
    "dsa_patency": DSA_PATENCY_PROMPT,
}
