"""dicom_agent: everything about where studies come from and where results go.

The package layout follows the data flow (ARCHITECTURE.md): ``scp`` (C-STORE listener) →
``spool`` (durable storage, ``incoming`` writing a data set as it arrives) → ``state`` (SQLite) → ``inbox`` (drafts) / ``scheduler`` (pairing) →
``worker`` (the job loop: ``prepare`` routes and decodes a study with ``routing`` and
``pixels``, ``registry`` holds the loaded :mod:`cxr_auditor` runners) → ``outputs`` (SR, GSPS,
SC, JSON, in the out/ layout of ``outputs.layout``) → ``forward`` (C-STORE back to a research
PACS). ``agent`` runs them together under ``cxr-agent serve``; ``cli`` and ``commands`` are
the command line; ``config``, ``errors``, ``observe``, ``conformance`` and ``files`` serve them
all.

Modules are imported on use (``from dicom_agent.scp import start_listener``): importing this
package loads nothing heavy. ``__all__`` names the public modules; a test keeps it complete.
"""

__all__ = [
    "agent",
    "cli",
    "commands",
    "config",
    "conformance",
    "demo",
    "errors",
    "files",
    "finals",
    "forward",
    "inbox",
    "incoming",
    "listener_pool",
    "observe",
    "outputs",
    "pixels",
    "ports",
    "prepare",
    "progress",
    "reactor",
    "registry",
    "replay",
    "routing",
    "scheduler",
    "scp",
    "spool",
    "state",
    "transport",
    "web",
    "worker",
]
