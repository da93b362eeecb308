"""Routing: which instances of a study are audited, by which profile, and why others are not."""

from __future__ import annotations

import pytest

from dicom_agent.routing import SkipReason, route_instance, route_study
from dicom_agent.state import InstanceRow, InstanceState


def row(sop: str, modality: str | None = "DX", view: str | None = "PA", body: str | None = "CHEST",
        state: InstanceState = InstanceState.STORED) -> InstanceRow:
    return InstanceRow(sop, "1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.1.1", modality, None, view,
                       body, f"/s/{sop}.dcm", "h", 1, state.value, 0.0, 0.0)


class TestRouteInstance:
    @pytest.mark.parametrize(
        ("modality", "view", "body", "expected"),
        [
            ("DX", "PA", "CHEST", ("cxr", None)),
            ("CR", "AP", None, ("cxr", None)),
            ("SC", "PA", "CHEST", ("cxr", None)),
            ("DX", None, "CHEST", ("cxr", None)),
            ("DX", "", "chest", ("cxr", None)),
            ("DX", None, "HAND", (None, SkipReason.NOT_CHEST)),
            ("DX", "LL", "CHEST", (None, SkipReason.LATERAL)),
            ("CR", "RL", "CHEST", (None, SkipReason.LATERAL)),
            ("DX", "LATERAL", "CHEST", (None, SkipReason.LATERAL)),
            ("CT", None, "CHEST", (None, SkipReason.NO_PROFILE)),
            ("XA", None, None, (None, SkipReason.NO_PROFILE)),
        ],
    )
    def test_rules(self, modality: str, view: str | None, body: str | None, expected: tuple) -> None:
        assert route_instance(row("1", modality, view, body), "cxr") == expected

    def test_xa_goes_to_the_configured_classification_profile(self) -> None:
        assert route_instance(row("1", "XA", None, None), "cxr", xa_profile="dsa-patency") == (
            "dsa-patency", None)

    def test_ignored_instances_are_never_audited(self) -> None:
        assert route_instance(row("1", state=InstanceState.IGNORED), "cxr") == (
            None, SkipReason.IGNORED)


class TestRouteStudy:
    def test_frontal_selected_lateral_skipped_with_reason(self) -> None:
        route = route_study([row("pa"), row("lat", view="LL")], "cxr")
        assert route.profile == "cxr"
        assert [r.sop_instance_uid for r in route.selected] == ["pa"]
        assert route.skipped == [{"image_id": "lat", "reason": "lateral_view"}]

    def test_one_profile_per_study_others_skipped(self) -> None:
        route = route_study([row("xa", "XA"), row("pa")], "cxr", xa_profile="dsa-patency")
        assert route.profile == "dsa-patency"
        assert route.skipped == [{"image_id": "pa", "reason": "other_profile"}]

    def test_profile_routing_rules_can_veto(self) -> None:
        only_dx = {"cxr": lambda modality, sop, body, view: modality == "DX"}
        route = route_study([row("cr", "CR"), row("dx")], "cxr", profile_routes=only_dx)
        assert [r.sop_instance_uid for r in route.selected] == ["dx"]
        assert route.skipped == [{"image_id": "cr", "reason": "profile_routing_rules"}]

    def test_nothing_routable_gives_no_profile(self) -> None:
        route = route_study([row("lat", view="LL")], "cxr")
        assert route.profile is None and route.selected == []
