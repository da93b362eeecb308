"""dicom_agent's ``__all__`` lists exactly its public modules, sorted, and each imports."""

from __future__ import annotations

import importlib
import pkgutil

import dicom_agent


def test_all_is_sorted_and_names_every_public_module() -> None:
    public = {
        m.name for m in pkgutil.iter_modules(dicom_agent.__path__) if not m.name.startswith("_")
    }
    assert dicom_agent.__all__ == sorted(dicom_agent.__all__)
    assert set(dicom_agent.__all__) == public


def test_every_listed_module_imports() -> None:
    for name in dicom_agent.__all__:
        assert importlib.import_module(f"dicom_agent.{name}").__name__ == f"dicom_agent.{name}"
