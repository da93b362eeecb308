"""Draft-parser metrics, and the quality gate on the hand-labelled development set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.eval.drafts import (
    GoldReport,
    build_parser,
    evaluate,
    format_side_by_side,
    format_table,
    load_gold,
    main,
    negated_list_labels,
)
from cxr_auditor.labels import Label
from cxr_auditor.schema import DraftFinding, DraftResult, DraftState, DraftStatus, ModelInfo

DATA = Path(__file__).resolve().parents[2] / "data"


class _Fixed(DraftParser):
    """Answers every draft with the same findings."""

    name = "fixed"
    info = ModelInfo(profile="fixed", task="draft_parsing", backend="fake")

    def __init__(self, findings: dict[Label, DraftStatus]) -> None:
        self.findings = findings

    def parse(self, text: str) -> DraftResult:
        return DraftResult(
            state=DraftState.PARSED,
            findings=[
                DraftFinding(label=lab, status=st, span=text[:1], start=0, end=1)
                for lab, st in self.findings.items()
            ],
        )


def _gold(**labels: str) -> GoldReport:
    return GoldReport(
        id="g", text="x", labels={Label(k): DraftStatus(v) for k, v in labels.items()}
    )


def test_counts_precision_recall_and_accuracies() -> None:
    gold = [
        _gold(pleural_effusion="present", pneumothorax="absent"),
        _gold(pleural_effusion="absent", lung_opacity_consolidation="uncertain"),
    ]
    parser = _Fixed({Label.PLEURAL_EFFUSION: DraftStatus.PRESENT,
                     Label.PNEUMOTHORAX: DraftStatus.ABSENT,
                     Label.NODULE_MASS: DraftStatus.UNCERTAIN})
    m = evaluate(gold, parser)
    eff = m.per_label[Label.PLEURAL_EFFUSION]
    assert (eff.tp, eff.fp, eff.fn) == (1, 1, 0)
    assert eff.precision.value == 0.5 and eff.recall.value == 1.0
    assert m.negation.total == 2 and m.negation.right == 1  # ptx right, 2nd effusion wrong
    assert m.hedge.total == 1 and m.hedge.right == 0  # the opacity hedge was missed
    assert m.status.total == 4 and m.status.right == 2
    assert m.spurious == 3  # nodule in both reports, pneumothorax in the second
    assert ("g", "lung_opacity_consolidation", "uncertain", "-") in m.errors


def test_load_gold_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "gold.jsonl"
    path.write_text('{"id": 1, "text": "a", "labels": {}}\n{"id": 2, "labels": {"x": "present"}}\n')
    with pytest.raises(ValueError, match=r"gold\.jsonl:2"):
        load_gold(path)


def test_dev_set_quality_gate() -> None:
    gold = load_gold(DATA / "drafts_dev.jsonl")
    assert len(gold) >= 180
    m = evaluate(gold)
    assert m.macro_f1 >= 0.97, format_table(m)
    assert m.negation_accuracy >= 0.99, format_table(m)
    assert m.hedge.total >= 25 and m.hedge_accuracy >= 0.9, format_table(m)


#: The gold sets in the order they were written, each with its minimum size.
GOLD_SETS = (
    ("drafts_dev.jsonl", 180),
    ("drafts_holdout.jsonl", 40),
    ("drafts_holdout2.jsonl", 120),
    ("drafts_holdout3.jsonl", 230),
    ("drafts_holdout4.jsonl", 150),
    ("drafts_holdout5.jsonl", 110),
    ("drafts_holdout6.jsonl", 110),
    ("drafts_holdout7.jsonl", 90),
    ("drafts_holdout8.jsonl", 90),
)


@pytest.mark.parametrize("index", range(1, len(GOLD_SETS)), ids=[n for n, _ in GOLD_SETS[1:]])
def test_holdout_set_is_well_formed_and_new(index: int) -> None:
    name, minimum = GOLD_SETS[index]
    gold = load_gold(DATA / name)
    assert len(gold) >= minimum
    assert len({g.id for g in gold}) == len(gold)
    earlier = {g.text for n, _ in GOLD_SETS[:index] for g in load_gold(DATA / n)}
    assert not {g.text for g in gold} & earlier


def test_regression_gate_on_all_gold_sets() -> None:
    """The holdout sets were unseen when written; after the rules they prompted, they guard
    against regressions (their first-run figures are in docs/draft-parser.md)."""
    gold = [g for name, _ in GOLD_SETS for g in load_gold(DATA / name)]
    m = evaluate(gold)
    assert m.macro_f1 >= 0.97, format_table(m)
    assert m.negation_accuracy >= 0.99, format_table(m)
    assert m.hedge_accuracy >= 0.95, format_table(m)


def test_main_prints_table_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "No pneumothorax.",
                                "labels": {"pneumothorax": "absent"}}) + "\n")
    assert main([f"mine={path}", "--parser", "rules", "--detail"]) == 0
    out = capsys.readouterr().out
    assert "| mine | rules | 1 |" in out and "negation accuracy: 1.000 over 1" in out
    assert main([str(path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["set"], r["parser"]) for r in runs] == [("g", "rules"), ("g", "negex")]
    assert runs[0]["reports"] == 1 and runs[0]["negation_mentions"] == 1
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert main([str(path), "--parser", "no-such-parser"]) == 2
    assert main([str(path), "--prefix", "b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["reports"] == 0


def test_silver_records_make_uncertain_cells_dont_care(tmp_path: Path) -> None:
    path = tmp_path / "silver.jsonl"
    rows = [
        {"id": "s1", "text": "Possible small left pleural effusion.",
         "labels": [{"label": "pleural_effusion", "status": "present"}]},
        {"id": "s2", "text": "Small left pleural effusion.",
         "labels": [{"label": "pleural_effusion", "status": "uncertain"}]},
        {"id": "s3", "text": "Unindexed.", "labels": None},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = load_gold(path)
    assert [g.id for g in gold] == ["s1", "s2"]
    assert gold[1].dont_care == {Label.PLEURAL_EFFUSION} and not gold[1].labels
    eff = evaluate(gold).per_label[Label.PLEURAL_EFFUSION]
    assert (eff.tp, eff.fp, eff.fn) == (0, 0, 1)  # s1 is a miss, s2 is not counted


@pytest.mark.parametrize(
    ("text", "listed"),
    [
        ("No consolidation, pneumothorax or sizeable pleural effusion.", {"pneumothorax",
                                                                        "pleural_effusion",
                                                                        "lung_opacity_consolidation"}),
        ("Without focal consolidation or effusion. Small right pneumothorax.",
         {"lung_opacity_consolidation", "pleural_effusion"}),
        # named outside the list too: not a list-only label
        ("No pneumothorax or effusion. Small left effusion.", {"pneumothorax"}),
        ("No pneumothorax. Small left effusion.", set()),
    ],
)
def test_negated_list_detector(text: str, listed: set[str]) -> None:
    assert {lab.value for lab in negated_list_labels(text)} == listed


def test_negated_list_false_positives_are_counted() -> None:
    gold = [GoldReport(id="n", text="No consolidation, pneumothorax or effusion.", labels={})]
    parser = _Fixed({Label.PNEUMOTHORAX: DraftStatus.PRESENT})
    m = evaluate(gold, parser)
    assert m.negated_list_fp == 1
    assert ("n", "pneumothorax", "negated-list", "present") in m.errors
    assert evaluate(gold).negated_list_fp == 0


def test_side_by_side_table_has_a_row_per_set_and_parser() -> None:
    gold = load_gold(DATA / "drafts_dev.jsonl")[:20]
    runs = [("dev", p.name, evaluate(gold, p)) for p in (build_parser("rules"),
                                                        build_parser("negex"))]
    table = format_side_by_side(runs)
    assert table.count("| dev |") == 2 and "neg-list FP" in table
