"""Research-only outputs of an audit: SR (TID 1500), GSPS, Secondary Capture, PNG, JSON.

One module per job: :mod:`.writer` writes a result version (``write_outputs``); :mod:`.layout`
owns the out/ folder layout and result versions; :mod:`.sr`, :mod:`.gsps` and :mod:`.sc` build
the DICOM objects from what they share in :mod:`.common` (device identity, references) and
:mod:`.codes`; :mod:`.uids` derives their UIDs; :mod:`.validate` checks each before it is
written; :mod:`.sidecar` writes the JSON. See docs/outputs.md.
"""
