"""Is a profile's hub repository usable here? One answer for the loader, doctor and models pull.

The question is asked through huggingface_hub's own HTTP session, the one a download uses, so
``HTTPS_PROXY``/``NO_PROXY`` (hospital networks are proxied), ``HF_ENDPOINT``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` apply to the check exactly as they apply to the download. The loader
(:func:`cxr_auditor.chat.transformers.load_model`), ``cxr-agent doctor`` and ``cxr-agent models
pull`` all call :func:`check_repo`, so they cannot disagree about the same repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "HUB_PROBE_SECONDS",
    "HubCheck",
    "HubState",
    "check_repo",
    "check_weights",
    "hub_endpoint",
    "is_local_ref",
]

#: How long the check may wait for the hub before it counts as unreachable.
HUB_PROBE_SECONDS = 5.0


class HubState(StrEnum):
    CACHED = "cached"  # in the local hub cache: loads without the network
    REACHABLE = "reachable"  # not cached; the hub answered and serves it: the first load downloads it
    GATED = "gated"  # the hub refuses it without a token that accepted the licence
    NOT_FOUND = "not_found"  # no such repository, revision or file (or private)
    OFFLINE = "offline"  # HF_HUB_OFFLINE=1 and not cached
    UNREACHABLE = "unreachable"  # no answer from the hub (network, proxy, DNS, timeout)


@dataclass(frozen=True)
class HubCheck:
    """The state of one repository and a sentence saying what it means and what to do."""

    repo_id: str
    state: HubState
    detail: str

    @property
    def loadable(self) -> bool:
        """True when a load can get the files: cached, or downloadable now."""
        return self.state in (HubState.CACHED, HubState.REACHABLE)


def is_local_ref(ref: str) -> bool:
    """A folder path rather than a hub id (``owner/name``): absolute, home- or dot-relative, or
    an existing folder."""
    return ref.startswith(("/", "~", ".")) or Path(ref).is_dir()


def hub_endpoint() -> str:
    """The hub the client talks to (``HF_ENDPOINT``, else huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def check_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    filename: str = "config.json",
    timeout: float = HUB_PROBE_SECONDS,
) -> HubCheck:
    """Whether ``repo_id`` at ``revision`` can be loaded here: from the cache, or downloaded.

    A cached ``filename`` answers without the network. Otherwise one metadata request for it
    (a HEAD, as the download itself makes) goes through the hub client's session; its error
    classes tell a gated repository from a missing one and from a hub that cannot be reached.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return HubCheck(repo_id, HubState.CACHED, f"{repo_id} is in the local hub cache")
    endpoint = hub_endpoint()
    if constants.HF_HUB_OFFLINE:
        return HubCheck(
            repo_id, HubState.OFFLINE,
            f"{repo_id} is not in the local hub cache and HF_HUB_OFFLINE=1: download it on a"
            " machine with access (cxr-agent models pull) or point the profile at a local folder",
        )
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass of it
        return HubCheck(
            repo_id, HubState.GATED,
            f"{repo_id} is gated: accept its licence on {endpoint}/{repo_id} with your account,"
            " then set HF_TOKEN to a read token of that account",
        )
    except RevisionNotFoundError:
        return HubCheck(repo_id, HubState.NOT_FOUND, f"{repo_id} has no revision {revision!r}")
    except RepositoryNotFoundError:
        return HubCheck(
            repo_id, HubState.NOT_FOUND,
            f"{repo_id} not found on {endpoint} (a private repository needs HF_TOKEN)",
        )
    except EntryNotFoundError:
        return HubCheck(repo_id, HubState.NOT_FOUND, f"{repo_id} has no file {filename}")
    except OfflineModeIsEnabled:
        return HubCheck(repo_id, HubState.OFFLINE, f"{repo_id} not cached and the hub client is offline")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        return HubCheck(repo_id, HubState.UNREACHABLE, f"{endpoint} answered HTTP {status} for {repo_id}")
    except Exception as exc:  # noqa: BLE001 - the client's transport errors (connect, proxy, TLS, timeout)
        return HubCheck(
            repo_id, HubState.UNREACHABLE,
            f"{repo_id} is not in the local hub cache and {endpoint} cannot be reached"
            f" ({type(exc).__name__}{_proxy_note()}): check the network or HTTPS_PROXY, or"
            " point the profile at a local folder",
        )
    return HubCheck(
        repo_id, HubState.REACHABLE,
        f"{repo_id} is not cached; {endpoint} serves it: the first load downloads it"
        " (or now: cxr-agent models pull)",
    )


def check_weights(what: str, repo_id: str, profile_revision: str | None) -> HubCheck:
    """:func:`check_repo` for a profile's ``model`` or ``adapter``, as the loader fetches it.

    The model is read at the profile's revision and has a ``config.json``; the adapter is read
    at its default branch (PEFT loads it without a revision) and has an ``adapter_config.json``.
    """
    if what == "adapter":
        return check_repo(repo_id, filename="adapter_config.json")
    return check_repo(repo_id, revision=profile_revision)


def _proxy_note() -> str:
    """Which proxy the client went through (host and port only: the URL may hold a password)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if not proxy:
        return ""
    parts = urlsplit(proxy)
    return f", through HTTPS_PROXY {parts.hostname}:{parts.port}" if parts.hostname else ", through HTTPS_PROXY"
