"""Exception tree of the agent.

::

    AgentError
     ├── ConfigError      a setting is invalid (message names the key)
     ├── SpoolError       an instance could not be stored durably
     │    ├── SpoolFullError   the free-space floor was reached
     │    └── InstanceTooLargeError   a data set grew past scp.max_instance_bytes
     ├── StateError       the state database failed
     │    └── CorruptStateError   its file is damaged (rebuild it from the spool)
     ├── DicomInputError  a dataset is malformed or not something we handle
     ├── OutputError      a result object failed to build or validate
     └── ForwardError     sending results to a destination failed (retried with backoff)
          └── ForwardRefused   refused for good: the job is dead at once
"""

from __future__ import annotations

from pathlib import Path


class AgentError(Exception):
    """Base of every error raised by :mod:`dicom_agent`."""


class ConfigError(AgentError):
    """Invalid configuration."""


class SpoolError(AgentError):
    """An instance could not be stored durably."""


class SpoolFullError(SpoolError):
    """Free disk space is below the configured floor."""


class InstanceTooLargeError(SpoolError):
    """A data set (or its inflated form) grew past ``scp.max_instance_bytes`` while arriving."""


class StateError(AgentError):
    """The state database failed."""


class CorruptStateError(StateError):
    """The state database file is damaged; the message says how to rebuild it."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"state database {path} is damaged ({detail[:300]}). Stop the agent, then run"
            " 'cxr-agent state rebuild': it moves the damaged file aside and rebuilds the"
            " instance and study rows from the spool (draft and job history are not in the"
            " spool: drafts are re-read only if put back in the drafts folder)"
        )
        self.path = path


class DicomInputError(AgentError):
    """A dataset is malformed or unsupported."""


class OutputError(AgentError):
    """A result object failed to build or validate."""


class ForwardError(AgentError):
    """Sending results to a destination failed."""


class ForwardRefused(ForwardError):
    """Permanent forwarding failure: the peer rejected the association permanently, answered
    a C-STORE with a refusal that does not depend on time (0xA9xx, 0xCxxx, 0x0122: PS3.4
    Annex B.2.3 and PS3.7 C.4), or the job names a file or destination that no longer exists.
    Sending the same objects again cannot succeed."""
