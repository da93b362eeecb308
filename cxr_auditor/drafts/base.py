"""The draft-parser interface: report text in, labelled statements with verbatim spans out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from cxr_auditor.schema import DraftResult, ModelInfo


class DraftParser(ABC):
    """Implementations: ``rules`` (default, deterministic) and the model-backed ``llm`` parser."""

    name: str
    info: ModelInfo

    @abstractmethod
    def parse(self, text: str) -> DraftResult:
        """Parse one draft. Returns state ``parsed`` or ``unparseable``; never raises on text."""

    def parse_many(self, texts: list[str]) -> list[DraftResult]:
        return [self.parse(t) for t in texts]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model resources (a model-backed parser holds a model or a client)."""
