"""Print the monitoring lines of ``/metrics`` after three studies went through a real ``serve``.

Used for the excerpt in docs/monitoring.md: an agent on the ``fake`` stand-in under a temporary
folder receives three studies over C-STORE, each with a draft, is audited, then gets the signed
final report in ``finals/``; once all three are compared the ``cxr_agent_monitor_*`` and
``cxr_agent_finals_*`` lines are printed. Research use only.

    .venv/bin/python -m benchmarks.monitoring_excerpt
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom.uid import generate_uid

from tests.support.agentproc import running_agent, store, wait_until
from tests.support.builders import make_cxr

#: (draft, signed final) per study; the stand-in finds a left pneumothorax and a right effusion.
CASES = [
    ("Small right pleural effusion. No pneumothorax.",
     "Left apical pneumothorax. Right pleural effusion."),
    ("Left pneumothorax. Right pleural effusion.", "Left pneumothorax. Small right effusion."),
    ("No acute abnormality.", "Right pleural effusion. No pneumothorax."),
]


def main() -> None:
    root = Path(tempfile.mkdtemp())
    with running_agent(root / "agent", {"monitoring": {"poll_seconds": 0.2}}) as agent:
        finals = agent.path("finals")
        finals.mkdir(parents=True, exist_ok=True)
        for n, (draft, final) in enumerate(CASES):
            uid, accession = generate_uid(), f"MON{n}"
            agent.drop_draft(f"{accession}.txt", draft)
            ds = make_cxr(rows=128, cols=112, study_uid=uid, accession=accession,
                          patient_orientation="L\\F")
            assert store(agent.port, [ds]) == [0x0000]
            wait_until(lambda uid=uid: agent.result(uid), timeout=30, what="the audit")
            part = finals / f"{accession}.part"  # the reader leaves *.part alone
            part.write_text(final, encoding="utf-8")
            part.rename(finals / f"{accession}.txt")

        def compared() -> bool:
            return len(agent.db_query("SELECT id FROM finals WHERE state = 'compared'")) == 3

        wait_until(compared, timeout=30, what="three compared finals")

        def gauges() -> str | None:
            text = agent.metrics()
            return text if 'cxr_agent_monitor_window_cases{label="pneumothorax",profile="fake"} 3.0' in text else None

        text = wait_until(gauges, timeout=30, what="the gauges of the third final")
        print("\n".join(
            line for line in text.splitlines()
            if ("monitor" in line or "cxr_agent_finals_total" in line) and "_created" not in line
        ))


if __name__ == "__main__":
    main()
