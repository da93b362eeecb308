"""Tests for dicom_agent.conformance: UID syntax, accepted sets, named statuses."""

from __future__ import annotations

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_agent import conformance as dc
from tests.support.builders import (
    CR_STORAGE,
    CT_STORAGE,
    DX_PRESENTATION,
    DX_PROCESSING,
    SC_STORAGE,
    XA_STORAGE,
)


class TestIsValidUid:
    @pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "2.25.1", "1." + "2" * 62])
    def test_accepts_ps35_uids(self, uid: str) -> None:
        assert dc.is_valid_uid(uid)

    @pytest.mark.parametrize(
        "uid",
        [
            "",
            "1.2.03",  # leading zero in a component
            "1..2",
            ".1.2",
            "1.2.",
            "1.2.a",
            "../../etc/passwd",
            "1.2/3",
            "1.2 3",
            "1." + "2" * 63,  # 65 characters
            None,
            12,
        ],
    )
    def test_rejects_anything_else(self, uid: object) -> None:
        assert not dc.is_valid_uid(uid)


class TestAcceptedSets:
    def test_chest_and_angio_classes_are_auditable(self) -> None:
        for uid in (CR_STORAGE, DX_PRESENTATION, DX_PROCESSING, SC_STORAGE, XA_STORAGE):
            assert dc.is_auditable(uid)
        assert dc.is_auditable("1.2.840.10008.5.1.4.1.1.12.1.1")  # Enhanced XA
        assert dc.is_auditable("1.2.840.10008.5.1.4.1.1.7.4")  # multi-frame true colour SC

    def test_ct_is_not_auditable(self) -> None:
        assert not dc.is_auditable(CT_STORAGE)

    def test_every_listed_uid_is_valid(self) -> None:
        for uid in [*dc.AUDITABLE_STORAGE_SOP_CLASSES, *dc.ACCEPTED_TRANSFER_SYNTAXES]:
            assert dc.is_valid_uid(uid), uid
        assert dc.is_valid_uid(dc.IMPLEMENTATION_CLASS_UID)

    def test_transfer_syntaxes_cover_uncompressed_and_common_compressed(self) -> None:
        for uid in (
            dc.IMPLICIT_VR_LITTLE_ENDIAN,
            dc.EXPLICIT_VR_LITTLE_ENDIAN,
            dc.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5",
        ):
            assert uid in dc.ACCEPTED_TRANSFER_SYNTAXES


class TestStatuses:
    @pytest.mark.parametrize(
        ("code", "category"),
        [
            (dc.STATUS_SUCCESS, "Success"),
            (dc.STATUS_OUT_OF_RESOURCES, "Failure"),
            (dc.STATUS_REFUSED_TOO_LARGE, "Failure"),
            (dc.STATUS_DATASET_MISMATCH, "Failure"),
            (dc.STATUS_CANNOT_UNDERSTAND, "Failure"),
            (dc.STATUS_PROCESSING_FAILURE, "Failure"),
        ],
    )
    def test_codes_are_storage_statuses_of_the_right_category(
        self, code: int, category: str
    ) -> None:
        # pynetdicom's table transcribes PS3.4 B.2.3; a status outside it would be flagged
        # as unknown to the peer.
        assert STORAGE_SERVICE_CLASS_STATUS[code][0] == category
        assert code in dc.STATUS_NAMES
