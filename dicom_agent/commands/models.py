"""``cxr-agent audit`` and ``cxr-agent doctor``: one-off audits and model readiness checks.

``audit IMAGE...`` audits DICOM files (PS3.10) or PNG/JPEG pictures as one study, without the
listener, and prints the AuditResult JSON on stdout. DICOM pixels go through the same rendering
as the worker (:mod:`dicom_agent.pixels`); a picture file is taken as display-ready greys with an
unknown orientation (no patient side is derived). A classification profile (``dsa-patency``)
fills ``classification`` instead of grounding.

``doctor`` prints one line per check (``ok``, ``warn`` or ``FAIL``): dependencies, folders, and
for every configured profile whether it can load and, when not, why. It exits 1 when a check
failed. ``--load`` really loads each model (slow, needs the memory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from PIL import Image, UnidentifiedImageError

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.profiles import (
    OpenAIProfile,
    Profile,
    TransformersProfile,
    get_profile,
    load_profiles,
)
from cxr_auditor.schema import ImageRef, StudyKeys
from dicom_agent.commands import fail
from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from dicom_agent.worker import AuditRunner

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()

_CONFIG = typer.Option(None, "--config", help="YAML file over the embedded defaults.")
_DICM_OFFSET = 128  # PS3.10 7.1: a 128-byte preamble, then the "DICM" prefix


def _settings(config: Path | None) -> AgentSettings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(str(exc).splitlines()[0])


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(_DICM_OFFSET)
        return fh.read(4) == b"DICM"


def _load_image(path: Path, index: int, size: int, profile: str) -> tuple[ImageInput, ImageRef]:
    """One input image, DICOM or picture, letterboxed to ``size`` for the model."""
    from dicom_agent.pixels import (
        DisplayImage,
        patient_left_on_image_right,
        read_dataset,
        to_display,
        to_model_input,
    )

    if _is_dicom(path):
        ds = read_dataset(path)
        model = to_model_input(to_display(ds), size)
        left_on_right = patient_left_on_image_right(ds)

        def attr(keyword: str) -> str | None:
            return str(ds.get(keyword, "")) or None

        sop_uid = attr("SOPInstanceUID")
        ref = ImageRef(
            index=index,
            image_id=sop_uid or path.name,
            sop_instance_uid=sop_uid,
            series_instance_uid=attr("SeriesInstanceUID"),
            sop_class_uid=attr("SOPClassUID"),
            view_position=attr("ViewPosition"),
            width=model.geometry.source_width,
            height=model.geometry.source_height,
            frame=model.frame,
            profile=profile,
        )
    else:
        try:
            with Image.open(path) as picture:
                greys = np.asarray(picture.convert("L"))
        except (UnidentifiedImageError, OSError) as exc:
            raise AgentError(f"{path.name}: neither DICOM nor a readable picture") from exc
        model = to_model_input(DisplayImage(greys, "MONOCHROME2", None, None, ()), size)
        left_on_right = None  # a picture carries no Patient Orientation
        ref = ImageRef(
            index=index,
            image_id=path.name,
            width=model.geometry.source_width,
            height=model.geometry.source_height,
            profile=profile,
        )
    image = ImageInput(model.image, index, model.geometry, left_on_right)
    return image, ref


def _runner(profile: Profile, parser_name: str, settings: AgentSettings) -> AuditRunner:
    """What the worker would run for this profile, with the chosen draft parser."""
    from cxr_auditor.classification import PatencyClassifier
    from cxr_auditor.drafts import get_parser
    from cxr_auditor.grounding import build_grounder
    from cxr_auditor.pipeline import Auditor, ClassificationAuditor

    if profile.task == "classification":
        return ClassificationAuditor(PatencyClassifier(profile))
    parser = get_parser(parser_name, profiles_dir=settings.paths.profiles)
    return Auditor(build_grounder(profile), parser, settings.audit.urgent_labels)


def _close(runner: AuditRunner) -> None:
    from cxr_auditor.pipeline import Auditor, ClassificationAuditor

    if isinstance(runner, Auditor):
        runner.grounder.close()
    elif isinstance(runner, ClassificationAuditor):
        runner.close()


@app.command("audit")
def audit(
    images: Annotated[list[Path], typer.Argument(help="DICOM files or PNG/JPEG pictures.")],
    draft_file: Annotated[
        Path | None, typer.Option("--draft-file", help="Draft report text file.")
    ] = None,
    draft: Annotated[str | None, typer.Option("--draft", help="Draft report text.")] = None,
    profile_name: Annotated[
        str | None, typer.Option("--profile", help="Model profile (default: grounding.profile).")
    ] = None,
    parser_name: Annotated[
        str | None, typer.Option("--parser", help="Draft parser (default: drafts.parser).")
    ] = None,
    config: Path | None = _CONFIG,
) -> None:
    """Audit IMAGE... as one study and print the AuditResult JSON (research use only)."""
    from cxr_auditor.pipeline import AuditItem

    if draft_file is not None and draft is not None:
        fail("give --draft-file or --draft, not both")
    settings = _settings(config)
    name = profile_name or settings.grounding.profile
    try:
        profile = get_profile(name, settings.paths.profiles)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    if profile.task == "draft_parsing":
        fail(f"profile {profile.name!r} parses drafts; give a grounding or classification profile")
    draft_text, draft_sha = draft, None
    if draft_file is not None:
        try:
            data = draft_file.read_bytes()
        except OSError as exc:
            fail(f"cannot read draft file {draft_file}: {exc.strerror or exc}")
        draft_text = data.decode("utf-8-sig", errors="replace")
        draft_sha = hashlib.sha256(data).hexdigest()

    inputs: list[ImageInput] = []
    refs: list[ImageRef] = []
    for path in images:
        if not path.is_file():
            fail(f"not a file: {path}")
        try:
            image, ref = _load_image(path, len(inputs), settings.grounding.input_size, profile.name)
        except AgentError as exc:
            fail(str(exc))
        inputs.append(image)
        refs.append(ref)

    item = AuditItem(
        images=inputs,
        image_refs=refs,
        draft_text=draft_text,
        study=StudyKeys(),
        draft_file=draft_file.name if draft_file else None,
        draft_sha256=draft_sha,
    )
    try:
        runner = _runner(profile, parser_name or settings.drafts.parser, settings)
        try:
            (result,) = runner.audit_batch([item])
        finally:
            _close(runner)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    typer.echo(result.to_json())


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def _line(state: str, what: str, detail: str) -> tuple[str, str]:
    return state, f"{state:<4} {what}: {detail}"


def _dependency_checks() -> list[tuple[str, str]]:
    out = []
    for module, why in [
        ("pydicom", "DICOM files"),
        ("pynetdicom", "DICOM network"),
        ("highdicom", "SR output"),
        ("torch", "in-process models ('models' extra)"),
        ("transformers", "in-process models ('models' extra)"),
        ("peft", "adapter profiles"),
        ("bitsandbytes", "4-bit profiles (GPU)"),
    ]:
        found = importlib.util.find_spec(module) is not None
        required = module in {"pydicom", "pynetdicom", "highdicom"}
        state = "ok" if found else ("FAIL" if required else "warn")
        out.append(_line(state, f"dependency {module}", "installed" if found else f"missing ({why})"))
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpu = torch.cuda.is_available()
        detail = torch.cuda.get_device_name(0) if gpu else "none: models run on CPU (slow)"
        out.append(_line("ok" if gpu else "warn", "CUDA GPU", detail))
    for binary in ("storescu", "dciodvfy"):
        found = shutil.which(binary) is not None
        out.append(_line("ok" if found else "warn", f"tool {binary}", "found" if found else "not on PATH"))
    return out


def _folder_checks(settings: AgentSettings) -> list[tuple[str, str]]:
    out = []
    for name, folder in settings.folders().items():
        probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), None)
        if probe is None or not os.access(probe, os.W_OK):
            out.append(_line("FAIL", f"folder paths.{name}", f"{folder} is not writable"))
        else:
            state = "exists" if folder.exists() else "will be created"
            out.append(_line("ok", f"folder paths.{name}", f"{folder} ({state})"))
    if settings.paths.profiles is not None and not settings.paths.profiles.is_dir():
        out.append(_line("FAIL", "folder paths.profiles", f"{settings.paths.profiles} is not a folder"))
    return out


_SEVERITY = {"ok": 0, "warn": 1, "FAIL": 2}


def _weights_present(profile: TransformersProfile, ref: str) -> tuple[str, str]:
    """(state, detail) of ``ref`` (a folder or a hub id): usable here without a download?"""
    if Path(ref).is_dir():
        return "ok", f"folder {ref}"
    if Path(ref).is_absolute() or ref.startswith("."):
        return "FAIL", f"folder {ref} does not exist"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "FAIL", "huggingface_hub is not installed"
    name = "adapter_config.json" if ref == profile.adapter else "config.json"
    revision = profile.revision if ref == profile.model else None
    if isinstance(try_to_load_from_cache(ref, name, revision=revision), str):
        return "ok", f"{ref} in the local hub cache"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "FAIL", f"{ref} not in the local hub cache and HF_HUB_OFFLINE=1"
    token = "HF_TOKEN set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN: gated repos need one"
    return "warn", f"{ref} not cached, the first load downloads it ({token})"


def _profile_check(profile: Profile, load: bool) -> tuple[str, str]:
    what = f"profile {profile.name} ({profile.task}, {profile.backend})"
    if isinstance(profile, TransformersProfile):
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return _line("FAIL", what, "torch/transformers not installed ('models' extra)")
        if profile.adapter and importlib.util.find_spec("peft") is None:
            return _line("FAIL", what, "peft not installed (needed to merge the adapter)")
        checks = [_weights_present(profile, profile.model)]
        if profile.adapter:
            checks.append(_weights_present(profile, profile.adapter))
        if profile.load_in_4bit:
            import torch

            if not torch.cuda.is_available():
                checks.append(("FAIL", "4-bit loading needs a CUDA GPU"))
        state = max((c[0] for c in checks), key=_SEVERITY.__getitem__)
        if state == "ok" and load:
            return _loads(profile, what)
        return _line(state, what, "; ".join(detail for _, detail in checks))
    if isinstance(profile, OpenAIProfile):
        return _server_check(profile, what)
    return _line("ok", what, "no model needed")


def _loads(profile: TransformersProfile, what: str) -> tuple[str, str]:
    from cxr_auditor.chat.transformers import load_model

    try:
        loaded = load_model(profile)
    except CxrAuditError as exc:
        return _line("FAIL", what, str(exc).splitlines()[0])
    merge = "" if loaded.merge_delta is None else f", adapter merge max |delta| {loaded.merge_delta:.3g}"
    detail = f"loaded on {loaded.device}{merge}"
    del loaded
    return _line("ok", what, detail)


def _server_check(profile: OpenAIProfile, what: str) -> tuple[str, str]:
    import httpx

    headers = {}
    if profile.api_key_env and os.environ.get(profile.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[profile.api_key_env]}"
    url = profile.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=5.0)
    except httpx.HTTPError as exc:
        return _line("FAIL", what, f"{profile.base_url} unreachable ({type(exc).__name__})")
    if response.status_code != 200:
        return _line("FAIL", what, f"{url} answered HTTP {response.status_code}")
    try:
        served = {m.get("id") for m in response.json().get("data", [])}
    except (ValueError, AttributeError):
        served = set()
    if served and profile.model not in served:
        return _line("FAIL", what, f"server does not serve model {profile.model!r}")
    return _line("ok", what, f"{profile.base_url} serves {profile.model!r}")


def _configured(settings: AgentSettings) -> list[str]:
    names = [settings.grounding.profile, settings.drafts.parser]
    if settings.grounding.xa_profile:
        names.append(settings.grounding.xa_profile)
    return list(dict.fromkeys(names))


@app.command("doctor")
def doctor(
    all_profiles: Annotated[
        bool, typer.Option("--all", help="Check every known profile, not only the configured ones.")
    ] = False,
    load: Annotated[
        bool, typer.Option("--load", help="Really load each in-process model (slow).")
    ] = False,
    config: Path | None = _CONFIG,
) -> None:
    """One line per check: dependencies, folders, and whether each profile can load."""
    settings = _settings(config)
    lines = _dependency_checks() + _folder_checks(settings)
    try:
        known = load_profiles(settings.paths.profiles)
    except CxrAuditError as exc:
        lines.append(_line("FAIL", "profiles", str(exc).splitlines()[0]))
        known = {}
    names = sorted(known) if all_profiles else _configured(settings)
    for name in names:
        if name not in known:
            lines.append(_line("FAIL", f"profile {name}", "not found in config/profiles or paths.profiles"))
            continue
        lines.append(_profile_check(known[name], load))
    for _, text in lines:
        typer.echo(text)
    if any(state == "FAIL" for state, _ in lines):
        raise typer.Exit(1)
