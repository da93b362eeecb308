"""Exception tree of the agent.

::

    AgentError
     ├── ConfigError      a setting is invalid (message names the key)
     ├── SpoolError       an instance could not be stored durably
     │    └── SpoolFullError   the free-space floor was reached
     ├── StateError       the state database failed
     ├── DicomInputError  a dataset is malformed or not something we handle
     ├── OutputError      a result object failed to build or validate
     └── ForwardError     sending results to a destination failed
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error raised by :mod:`dicom_agent`."""


class ConfigError(AgentError):
    """Invalid configuration."""


class SpoolError(AgentError):
    """An instance could not be stored durably."""


class SpoolFullError(SpoolError):
    """Free disk space is below the configured floor."""


class StateError(AgentError):
    """The state database failed."""


class DicomInputError(AgentError):
    """A dataset is malformed or unsupported."""


class OutputError(AgentError):
    """A result object failed to build or validate."""


class ForwardError(AgentError):
    """Sending results to a destination failed."""
