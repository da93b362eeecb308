"""Exception tree of the audit core.

::

    CxrAuditError
     ├── ParseError          model output could not be parsed (carries raw_text)
     ├── ProfileError        a model profile is invalid or cannot be found
     ├── BackendError        a model backend failed to load or to answer
     │    └── ModelUnavailable   the model cannot be loaded here (no weights, no GPU, gated repo)
     └── DraftInputError     draft text is empty or unusable
"""

from __future__ import annotations


class CxrAuditError(Exception):
    """Base of every error raised by :mod:`cxr_auditor`."""


class ParseError(CxrAuditError, ValueError):
    """Model output could not be parsed. ``raw_text`` keeps what the model said."""

    def __init__(self, message: str, raw_text: str = "") -> None:
        super().__init__(message)
        self.raw_text = raw_text

    def __reduce__(self) -> tuple[type[ParseError], tuple[str, str]]:
        return (type(self), (str(self), self.raw_text))


class ProfileError(CxrAuditError):
    """A model profile is invalid or missing."""


class BackendError(CxrAuditError):
    """A model backend failed."""


class ModelUnavailable(BackendError):
    """The configured model cannot be loaded in this environment; the reason says why."""


class DraftInputError(CxrAuditError, ValueError):
    """Draft text is empty or otherwise unusable."""
