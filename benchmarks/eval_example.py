"""Write the small labelled set of docs/evaluation.md's example into a folder.

Five solid pictures (three bright, two dark: the ``fake`` stand-in answers a left pneumothorax
and a right effusion on a bright image, no finding on a dark one) and ``truth.jsonl`` with one
boxed case, one labelled draft case and two labels the stand-in gets wrong. Research use only.
``tests/dicom_agent/commands/test_eval_cli.py`` runs it and checks the rows the docs quote.

    .venv/bin/python -m benchmarks.eval_example /tmp/eval-example
    .venv/bin/cxr-agent eval --images /tmp/eval-example --truth /tmp/eval-example/truth.jsonl \\
        --profile fake
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cxr_auditor.grounding.fake import BRIGHT_ANSWER
from tests.support.tinymodels import solid_image

PTX_BOX, _ = (item["box_2d"] for item in json.loads(BRIGHT_ANSWER))

CASES = [
    {"image": "bright1.png", "labels": ["pneumothorax", "pleural_effusion"],
     "boxes": [{"label": "pneumothorax", "box_2d": PTX_BOX},
               # half a box width away from the stand-in's effusion box: IoU 1/3
               {"label": "pleural_effusion", "box_2d": [0.6, 0.23, 0.92, 0.57]}],
     "draft": "No pneumothorax.",
     "flags": [{"kind": "missing", "label": "pneumothorax"},
               {"kind": "urgent", "label": "pneumothorax"},
               {"kind": "missing", "label": "pleural_effusion"}]},
    {"image": "bright2.png", "labels": ["pneumothorax"]},
    {"image": "bright3.png", "labels": []},
    {"image": "dark1.png", "labels": []},
    {"image": "dark2.png", "labels": ["nodule_mass"]},
]
GREYS = {"bright1.png": 255, "bright2.png": 230, "bright3.png": 200, "dark1.png": 0,
         "dark2.png": 40}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, grey in GREYS.items():
        solid_image(grey).save(folder / name)
    (folder / "truth.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CASES))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
