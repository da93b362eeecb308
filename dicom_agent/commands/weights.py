"""``cxr-agent models pull PROFILE``: download a profile's weights (and adapter) before serving.

The first load of a hub profile otherwise downloads several GB while the agent reports the
model ``loading``. ``pull`` fetches the same files into the same hub cache (``HF_HOME``,
``HF_HUB_CACHE``) with progress bars, after the check the loader runs
(:func:`~cxr_auditor.chat.hub.check_weights`): a gated repository, a missing one or a hub that
cannot be reached is said in one line, with what to do. ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HTTPS_PROXY`` apply as they do to the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_agent.commands import CONFIG_OPTION, fail, settings_or_fail
from dicom_agent.progress import print_summary

#: The commands of this module; :mod:`dicom_agent.cli` adds them to ``cxr-agent``.
app = typer.Typer()
models_app = typer.Typer(help="Model weights: pre-download a profile's files into the hub cache.")
app.add_typer(models_app, name="models")

#: Files of other frameworks and formats a transformers load never reads: not downloaded.
SKIPPED_FILES = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite"]


@models_app.command("pull")
def pull(
    profile_name: Annotated[str, typer.Argument(help="Profile whose model (and adapter) to download.")],
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Download PROFILE's weights and adapter into the hub cache, with progress bars."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        fail("models pull needs huggingface_hub, part of the 'models' extra (bash scripts/setup.sh)")

    from cxr_auditor.chat.hub import check_weights, is_local_ref
    from cxr_auditor.errors import CxrAuditError
    from cxr_auditor.profiles import OpenAIProfile, TransformersProfile, get_profile

    settings = settings_or_fail(config)
    try:
        profile = get_profile(profile_name, settings.paths.profiles)
    except CxrAuditError as exc:
        fail(str(exc).splitlines()[0])
    if isinstance(profile, OpenAIProfile):
        fail(f"profile {profile.name} is served by an OpenAI-compatible server ({profile.base_url}):"
             " nothing to download here; the server loads the weights (docs/models.md, vLLM)")
    if not isinstance(profile, TransformersProfile):
        typer.echo(f"profile {profile.name} ({profile.backend}) needs no weights: nothing to download")
        return
    refs = [("model", profile.model, profile.revision)]
    if profile.adapter:
        refs.append(("adapter", profile.adapter, None))  # PEFT loads the adapter's default branch
    pulled: list[tuple[str, object]] = []
    for what, ref, revision in refs:
        if is_local_ref(ref):
            if not Path(ref).expanduser().is_dir():
                fail(f"{what} folder {ref} does not exist")
            typer.echo(f"{what}: local folder {ref}, nothing to download")
            pulled.append((what, f"local folder {ref}"))
            continue
        check = check_weights(what, ref, profile.revision)
        if not check.loadable:
            fail(f"{what}: {check.detail}")
        typer.echo(f"{what}: {ref}{'@' + revision if revision else ''} ({check.state})")
        try:
            path = snapshot_download(ref, revision=revision, ignore_patterns=SKIPPED_FILES)
        except GatedRepoError:
            fail(f"{what}: {ref} is gated: accept its licence on the hub with your account, then set"
                 " HF_TOKEN to a read token of that account")
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            fail(f"{what}: download of {ref} failed ({type(exc).__name__}: {str(exc).splitlines()[0]});"
                 " run the command again to resume")
        typer.echo(f"{what}: {ref} in the hub cache at {path}")
        pulled.append((what, f"{ref}{'@' + revision if revision else ''} -> {path}"))
    print_summary(f"models pull {profile.name}", pulled)
    typer.echo(f"profile {profile.name} is ready to load: `cxr-agent doctor` checks it")
