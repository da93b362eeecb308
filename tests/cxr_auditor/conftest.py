"""Tiny-model fixtures for the audit-core tests (see tests/support/model_fixtures.py)."""

from tests.support.model_fixtures import (  # noqa: F401 - fixtures
    lora_adapter,
    projector_adapter,
    tiny_gemma,
    tiny_nemotron,
    tiny_root,
    trained_gemma,
    write_profiles,
    zero_lora_adapter,
)
