"""The shared progress bar and summary table of the long commands."""

from __future__ import annotations

import io

from rich.console import Console

from cxr_auditor.schema import AuditResult
from dicom_agent.progress import print_summary, print_table, progress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120, color_system=None), out


def test_bar_is_drawn_on_a_terminal_with_its_count() -> None:
    console, out = _console(terminal=True)
    with progress("Replaying", total=3, console=console) as bar:
        for _ in range(3):
            bar.advance()
        bar.note("done")
    text = out.getvalue()
    assert "Replaying" in text
    assert "3/3" in text


def test_nothing_is_drawn_off_a_terminal() -> None:
    console, out = _console(terminal=False)
    with progress("Replaying", total=2, console=console) as bar:
        bar.advance(2)
        bar.note("x")
    assert out.getvalue() == ""


def test_summary_table_holds_the_values_and_the_research_line() -> None:
    console, out = _console(terminal=False)
    print_summary("replay", [("studies", 4), ("failed", 1)], console=console)
    text = out.getvalue()
    assert "studies" in text and "4" in text and "failed" in text
    assert "Research use only" in text


def test_table_columns_and_empty_cells() -> None:
    console, out = _console(terminal=False)
    print_table("eval", ("label", "F1"), [("pneumothorax", "0.80"), ("cardiomegaly", None)],
                console=console)
    text = out.getvalue()
    assert "label" in text and "F1" in text and "0.80" in text and "None" not in text


def test_tables_in_a_pipe_keep_each_row_on_one_line(capsys: object) -> None:
    cells = ("1.000 [0.21-1.00] n=1",) * 6
    print_table("wide", ("a", "b", "c", "d", "e", "f"), [cells])  # stderr is captured: no terminal
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert any(line.count("n=1") == 6 for line in err.splitlines())


def _fake_audit() -> AuditResult:
    """A real audit by the fake grounder: a bright image, "No pneumothorax." as the draft."""
    from PIL import Image

    from cxr_auditor.drafts import get_parser
    from cxr_auditor.geometry import Geometry
    from cxr_auditor.grounding.base import ImageInput
    from cxr_auditor.grounding.fake import BRIGHT_ANSWER, FakeGrounder
    from cxr_auditor.pipeline import AuditItem, Auditor
    from cxr_auditor.schema import ImageRef, StudyKeys

    return Auditor(FakeGrounder(BRIGHT_ANSWER), get_parser("rules")).audit(AuditItem(
        images=[ImageInput(Image.new("RGB", (32, 32)), 0, Geometry.identity(32, 32), True)],
        image_refs=[ImageRef(index=0, image_id="a", width=32, height=32)],
        draft_text="No pneumothorax.", study=StudyKeys(),
        skipped_images=[{"image_id": "b", "reason": "lateral_view"}],
    ))


def test_result_rows_of_an_audit() -> None:
    from dicom_agent.progress import result_rows

    rows = dict(result_rows(_fake_audit()))
    assert rows["images audited"] == 1 and rows["images skipped"] == "1 lateral_view"
    assert rows["findings"] == "pleural_effusion, pneumothorax"
    assert rows["flags urgent"] == 1 and rows["flags missing"] == 2
    assert list(rows).index("flags urgent") < list(rows).index("flags missing")
    assert str(rows["time grounding"]).endswith(" ms")


def test_result_rows_show_every_flag_kind() -> None:
    from cxr_auditor.schema import Flag, FlagKind, Label
    from dicom_agent.progress import result_rows

    every = [Flag(kind=kind, label=Label.PNEUMOTHORAX, rationale="test") for kind in FlagKind]
    rows = dict(result_rows(_fake_audit().model_copy(update={"flags": every})))
    assert {k for k in rows if k.startswith("flags ")} == {f"flags {k.value}" for k in FlagKind}
    assert next(k for k in rows if k.startswith("flags ")) == "flags urgent"
