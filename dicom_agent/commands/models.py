"""``cxr-agent audit`` and ``cxr-agent doctor``: one-off audits and model readiness checks.

``audit IMAGE...`` audits DICOM files (PS3.10) or PNG/JPEG pictures as one study, without the
listener, and prints the AuditResult JSON on stdout. The study is prepared and run exactly as
``serve`` would with the chosen profile configured (:mod:`dicom_agent.prepare`,
:func:`dicom_agent.registry.build_runner`): the same routing (lateral views skipped), rendering
and study keys from the DICOM header. A picture file is taken as display-ready greys with an
unknown orientation (no patient side is derived). A classification profile (``dsa-patency``)
takes the route ``grounding.xa_profile`` names and fills ``classification`` instead of grounding.

``doctor`` prints one line per check (``ok``, ``warn`` or ``FAIL``): dependencies, folders, ports
(a test bind of the DICOM and HTTP ports: in use is a warning, no permission a failure), and
for every configured profile whether it can load and, when not, why. It exits 1 when a check
failed. ``--load`` really loads each model (slow, needs the memory).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.profiles import (
    OpenAIProfile,
    Profile,
    TransformersProfile,
    get_profile,
    load_profiles,
)
from dicom_agent.commands import (
    CONFIG_OPTION,
    PARSER_OPTION,
    PROFILE_OPTION,
    fail,
    settings_or_fail,
)
from dicom_agent.config import AgentSettings
from dicom_agent.errors import AgentError
from dicom_agent.ports import bind_tcp
from dicom_agent.prepare import Draft, configured_for, instances_from_files, prepare_study
from dicom_agent.progress import print_summary, progress, result_rows
from dicom_agent.registry import build_runner

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()

def _draft(draft_file: Path | None, draft: str | None) -> Draft:
    if draft_file is None:
        return Draft(draft)
    try:
        data = draft_file.read_bytes()
    except OSError as exc:
        fail(f"cannot read draft file {draft_file}: {exc.strerror or exc}")
    text = data.decode("utf-8-sig", errors="replace")
    return Draft(text, draft_file.name, hashlib.sha256(data).hexdigest())


@app.command("audit")
def audit(
    images: Annotated[list[Path], typer.Argument(help="DICOM files or PNG/JPEG pictures.")],
    draft_file: Annotated[
        Path | None, typer.Option("--draft-file", help="Draft report text file.")
    ] = None,
    draft: Annotated[str | None, typer.Option("--draft", help="Draft report text.")] = None,
    profile_name: str | None = PROFILE_OPTION,
    parser_name: str | None = PARSER_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Audit IMAGE... as one study and print the AuditResult JSON (research use only)."""
    if draft_file is not None and draft is not None:
        fail("give --draft-file or --draft, not both")
    settings = settings_or_fail(config)
    try:
        profile = get_profile(profile_name or settings.grounding.profile, settings.paths.profiles)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    if profile.task == "draft_parsing":
        fail(f"profile {profile.name!r} parses drafts; give a grounding or classification profile")
    study_draft = _draft(draft_file, draft)
    for path in images:
        if not path.is_file():
            fail(f"not a file: {path}")
    settings = configured_for(settings, profile)
    # Three steps, each of which can take a while (many files; a model load; the model).
    with progress(f"Auditing {len(images)} file(s)", total=3) as bar:
        bar.note("reading and decoding")
        try:
            rows, pictures, study = instances_from_files(images)
            prepared = prepare_study(
                rows, settings, study=study, draft=study_draft, pictures=pictures,
                fallback_profile=profile.name,
            )
        except AgentError as exc:
            fail(str(exc))
        bar.advance()
        try:
            if prepared.profile != profile.name:  # routed to the other configured profile
                profile = get_profile(prepared.profile, settings.paths.profiles)
            bar.note(f"loading {profile.name}")
            runner = build_runner(profile, parser_name or settings.drafts.parser, settings)
            bar.advance()
            bar.note("on the model")
            try:
                (result,) = runner.audit_batch([prepared.item])
            finally:
                runner.close()
            bar.advance()
        except CxrAuditError as exc:
            fail(str(exc).splitlines()[0])
    print_summary(f"audit ({profile.name})", result_rows(result))
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


def _port_checks(settings: AgentSettings) -> list[tuple[str, str]]:
    """Can ``serve`` bind its ports? A test bind of each (the DICOM port, the HTTP port).

    A port in use is a warning, not a failure: it is most often this agent, already serving.
    """
    ports = [("scp.port", settings.scp.host, settings.scp.port)]
    if settings.health.enabled:
        ports.append(("health.port", settings.health.host, settings.health.port))
    out = []
    for key, host, port in ports:
        what = f"port {key} {host}:{port}"
        if port == 0:
            out.append(_line("ok", what, "any free port"))
            continue
        try:
            bind_tcp(host, port).close()  # the bind serve does first
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                out.append(_line("warn", what, "in use (a running agent? see `cxr-agent"
                                 f" status`); otherwise change {key}"))
            elif exc.errno == errno.EACCES:
                out.append(_line("FAIL", what, "no permission: ports below 1024 need root or"
                                 f" CAP_NET_BIND_SERVICE; change {key}"))
            else:
                out.append(_line("FAIL", what, f"cannot bind: {exc.strerror}"))
            continue
        out.append(_line("ok", what, "free"))
    return out


_SEVERITY = {"ok": 0, "warn": 1, "FAIL": 2}


def _weights_present(profile: TransformersProfile, ref: str) -> tuple[str, str]:
    """(state, detail) of ``ref`` (a folder or a hub id): can the loader get it here?

    A hub id is asked through :func:`~cxr_auditor.chat.hub.check_weights`, the check the
    loader itself runs, so doctor and ``serve`` say the same thing about the same repository.
    """
    from cxr_auditor.chat.hub import check_weights, is_local_ref

    if is_local_ref(ref):
        if Path(ref).expanduser().is_dir():
            return "ok", f"folder {ref}"
        return "FAIL", f"folder {ref} does not exist"
    check = check_weights("adapter" if ref == profile.adapter else "model", ref, profile.revision)
    return ("ok" if check.loadable else "FAIL"), check.detail


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
    config: Path | None = CONFIG_OPTION,
) -> None:
    """One line per check: dependencies, folders, ports, and whether each profile can load."""
    settings = settings_or_fail(config)
    lines = _dependency_checks() + _folder_checks(settings) + _port_checks(settings)
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
