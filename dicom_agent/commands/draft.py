"""``cxr-agent parse-draft``: run a draft parser over one draft or a JSON Lines batch.

One draft (``FILE`` or ``-`` for stdin) prints a JSON list ``[{label, status, span, start, end
[, laterality]}]``. ``--jsonl IN.jsonl`` reads lines ``{"id", "text"}`` and writes one line
``{"id", "labels": [...]}`` per good input line to stdout, all in one process. A bad line (not
JSON, not an object, no string ``text``) gives ``error: line N: ...`` on stderr and is skipped;
the others are still parsed, and the exit status is then 1. Whole-input errors (missing file,
empty input, unknown parser) print one line and exit 2. Bytes that are not UTF-8 are replaced
(U+FFFD), said on stderr, and the text is still parsed. Draft text never goes to stderr or the log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cxr_auditor.drafts import get_parser
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.drafts.rules import as_records
from cxr_auditor.errors import CxrAuditError
from dicom_agent.commands import fail, settings_or_fail, warn

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()

STDIN = "-"


def _read(source: str) -> str:
    """The text of FILE or stdin; undecodable bytes are replaced and reported."""
    if source == STDIN:
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        path = Path(source)
        if not path.exists():
            fail(f"file not found: {source}")
        if not path.is_file():
            fail(f"not a file: {source}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            fail(f"cannot read {source}: {exc.strerror or exc}")
        name = source
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        warn(f"{name} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
        return data.decode("utf-8-sig", errors="replace")


def _parser(name: str, config: Path | None) -> DraftParser:
    profiles_dir = None
    if config is not None:
        profiles_dir = settings_or_fail(config).paths.profiles
    try:
        return get_parser(name, profiles_dir=profiles_dir)
    except CxrAuditError as exc:
        fail(f"parser {name!r}: {str(exc).splitlines()[0]}")


def _records(text: str) -> tuple[list[tuple[Any, str]], int]:
    """Good ``(id, text)`` records of a JSONL text, and how many lines were bad (reported)."""
    good: list[tuple[Any, str]] = []
    bad = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"not JSON ({exc.msg} at column {exc.colno})"
        else:
            if not isinstance(rec, dict):
                reason = "not a JSON object"
            elif not isinstance(rec.get("text"), str):
                reason = "no string 'text' field"
            else:
                good.append((rec.get("id"), rec["text"]))
                continue
        bad += 1
        typer.echo(f"error: line {lineno}: {reason}", err=True)
    return good, bad


@app.command("parse-draft")
def parse_draft(
    source: Annotated[
        str | None, typer.Argument(help="Draft text file, or '-' to read stdin.", metavar="[FILE|-]")
    ] = None,
    jsonl: Annotated[
        str | None,
        typer.Option("--jsonl", help="JSON Lines of {id, text} ('-' for stdin); one line out each."),
    ] = None,
    parser: Annotated[
        str, typer.Option("--parser", help="'rules' (default) or a draft_parsing profile name.")
    ] = "rules",
    config: Annotated[
        Path | None, typer.Option("--config", help="Agent YAML (for its profiles folder).")
    ] = None,
) -> None:
    """Parse a draft report into labelled statements with verbatim spans (research use only)."""
    if (source is None) == (jsonl is None):
        fail("give one draft FILE (or '-' for stdin), or --jsonl IN.jsonl")
    if jsonl is not None:
        text = _read(jsonl)
        if not text.strip():
            fail("input is empty: no JSON lines to parse")
        records, bad = _records(text)
        draft_parser = _parser(parser, config)
        try:
            results = draft_parser.parse_many([t for _, t in records])
        except CxrAuditError as exc:  # a model backend that cannot answer
            fail(f"parser {parser!r}: {str(exc).splitlines()[0]}")
        for (rid, _), result in zip(records, results, strict=True):
            line = {"id": rid, "state": result.state.value, "labels": as_records(result)}
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        if bad:
            fail(f"{bad} bad line(s) skipped; {len(records)} parsed", code=1)
        return
    assert source is not None
    text = _read(source)
    if not text.strip():
        fail("draft is empty")
    draft_parser = _parser(parser, config)
    try:
        result = draft_parser.parse(text)
    except CxrAuditError as exc:
        fail(f"parser {parser!r}: {str(exc).splitlines()[0]}")
    typer.echo(json.dumps(as_records(result), indent=2, ensure_ascii=False))
