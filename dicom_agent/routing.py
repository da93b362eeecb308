"""Routing: which stored instances of a study are audited, and by which model profile.

Decided from the header attributes kept in the state DB (no pixel decoding), so the worker can
route a study before it reads a single file:

- instances stored as ``ignored`` (unknown SOP class accepted with ``unknown_sop_class: ignore``)
  are never audited;
- chest radiographs (Modality CR, DX or SC) with a frontal View Position (PS3.3 C.8.11.5
  ``ViewPosition``: PA or AP) go to the grounding profile; a missing View Position is accepted
  when Body Part Examined (PS3.3 C.7.3.1) is CHEST;
- lateral views (LL, RL, LATERAL) are skipped: the grounding models were trained on frontal
  views only;
- XA goes to the classification profile named by ``grounding.xa_profile`` (``dsa-patency``)
  when one is configured, and is skipped otherwise;
- anything else is skipped, each skip with a reason that ends up in ``inputs.skipped_images``.

A study is audited by one profile: the one its first routable instance needs. Instances routed
to another profile are skipped with reason ``other_profile``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dicom_agent.state import InstanceRow, InstanceState

CHEST_MODALITIES = frozenset({"CR", "DX", "SC"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT"})

#: ``routes(modality, sop_class_uid, body_part, view_position) -> bool`` of a model profile
ProfileRoutes = Callable[[str | None, str | None, str | None, str | None], bool]


class SkipReason:
    """Reason codes written to ``inputs.skipped_images`` (never free text)."""

    IGNORED = "ignored_sop_class"
    LATERAL = "lateral_view"
    NOT_CHEST = "not_chest_frontal"
    NO_PROFILE = "no_profile_for_modality"
    PROFILE_REFUSED = "profile_routing_rules"
    OTHER_PROFILE = "other_profile"


@dataclass(frozen=True)
class Route:
    """The outcome for one study: the profile to run and the instances it audits."""

    profile: str | None
    selected: list[InstanceRow] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def route_instance(
    row: InstanceRow,
    grounding_profile: str,
    *,
    xa_profile: str | None = None,
) -> tuple[str | None, str | None]:
    """``(profile, None)`` when the instance is audited, ``(None, reason)`` when skipped."""
    if row.state == InstanceState.IGNORED.value:
        return None, SkipReason.IGNORED
    modality = (row.modality or "").upper()
    view = (row.view_position or "").upper().strip()
    body_part = (row.body_part or "").upper().strip()
    if modality == "XA":
        return (xa_profile, None) if xa_profile else (None, SkipReason.NO_PROFILE)
    if modality not in CHEST_MODALITIES:
        return None, SkipReason.NO_PROFILE
    if view in LATERAL_VIEWS:
        return None, SkipReason.LATERAL
    if view in FRONTAL_VIEWS or (not view and body_part == "CHEST"):
        return grounding_profile, None
    return None, SkipReason.NOT_CHEST


def route_study(
    instances: Sequence[InstanceRow],
    grounding_profile: str,
    *,
    xa_profile: str | None = None,
    profile_routes: dict[str, ProfileRoutes] | None = None,
) -> Route:
    """Select the instances of a study to audit and the profile that audits them.

    ``profile_routes`` lets a loaded profile veto an instance with its own routing rules.
    """
    chosen: str | None = None
    selected: list[InstanceRow] = []
    skipped: list[dict[str, str]] = []
    for row in instances:
        profile, reason = route_instance(row, grounding_profile, xa_profile=xa_profile)
        if profile is not None and profile_routes and profile in profile_routes:
            accepts = profile_routes[profile]
            if not accepts(row.modality, row.sop_class_uid, row.body_part, row.view_position):
                profile, reason = None, SkipReason.PROFILE_REFUSED
        if profile is None:
            skipped.append({"image_id": row.sop_instance_uid, "reason": reason or ""})
            continue
        if chosen is None:
            chosen = profile
        if profile != chosen:
            skipped.append({"image_id": row.sop_instance_uid, "reason": SkipReason.OTHER_PROFILE})
            continue
        selected.append(row)
    return Route(profile=chosen, selected=selected, skipped=skipped)
