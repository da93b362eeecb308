"""A data set held in memory, stored and read back through the spool's production steps.

The listener streams each data set into :meth:`Spool.open_incoming` and then calls
:meth:`Spool.check` and :meth:`Spool.commit` (``dicom_agent.scp``); :func:`store` runs the same
three steps, so tests store exactly the way C-STORE does, readable check included.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_agent.spool import (
    InstanceHeader,
    Spool,
    StoreResult,
    check_data_set,
    file_meta_bytes,
    part10_layout,
)


def store(
    spool: Spool,
    ds: Dataset,
    data: bytes,
    transfer_syntax_uid: str,
    *,
    source_ae_title: str | None = None,
) -> StoreResult:
    """Store ``data`` (``ds`` encoded in ``transfer_syntax_uid``) under the UIDs of ``ds``, as
    a C-STORE request for it would: open, write, the write's own error (floor, disk full),
    check, commit; the temp file goes either way."""
    incoming = spool.open_incoming(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), transfer_syntax_uid, source_ae_title
    )
    try:
        incoming.write(data)
        incoming.complete()
        if incoming.error is not None:  # the listener answers 0xA700 here, before the check
            raise incoming.error
        return spool.commit(incoming, spool.check(incoming))
    finally:
        incoming.discard()


def check_bytes(folder: Path, data: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """:func:`check_data_set` of ``data`` written behind a File Meta to a file in ``folder``."""
    path = folder / "checked.dcm"
    meta = file_meta_bytes("1.2.3", "1.2.3.4", transfer_syntax_uid, None)
    path.write_bytes(meta + data)
    return check_data_set(path, len(meta), transfer_syntax_uid, max_inflated_bytes=1 << 30)


def data_set_of(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part 10 file."""
    syntax, offset = part10_layout(path)
    return syntax, path.read_bytes()[offset:]


def sha256(data: bytes) -> str:
    """The digest the state DB records for a data set's bytes."""
    return hashlib.sha256(data).hexdigest()
