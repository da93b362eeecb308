"""The package fence: cxr_auditor exports an explicit, sorted API and knows nothing of DICOM.

Modelled on httpx's exported-members test and pynetdicom's hidden-module helper: the imports run
in a fresh interpreter whose meta path refuses the hidden packages, so a stray import anywhere
in the core fails loudly here.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import cxr_auditor

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    HIDDEN = {hidden!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"{{name}} is hidden from the audit core")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in HIDDEN:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())
    """
)

_DICOM = ("pydicom", "pynetdicom", "highdicom", "dicom_agent")


def _run(hidden: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCKER.format(hidden=set(hidden)) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_all_is_sorted_and_complete() -> None:
    exported = cxr_auditor.__all__
    assert exported == sorted(exported)
    public = {
        name
        for name in dir(cxr_auditor)
        if not name.startswith("_") and not inspect.ismodule(getattr(cxr_auditor, name))
    }
    assert public == set(exported)


def test_exports_come_from_the_package() -> None:
    for name in cxr_auditor.__all__:
        member = getattr(cxr_auditor, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__.startswith("cxr_auditor."), name


def test_import_works_with_dicom_and_model_libraries_hidden() -> None:
    hidden = (*_DICOM, "torch", "transformers", "peft", "accelerate")
    proc = _run(
        hidden,
        """
        import cxr_auditor
        from cxr_auditor.grounding.fake import FakeGrounder
        from cxr_auditor.pipeline import Auditor
        assert cxr_auditor.Auditor is Auditor and cxr_auditor.FakeGrounder is FakeGrounder
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
        print("LEAKED", leaked)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stdout


def test_every_core_module_imports_without_dicom() -> None:
    proc = _run(
        _DICOM,
        """
        import importlib
        import pkgutil
        import cxr_auditor
        names = [m.name for m in pkgutil.walk_packages(cxr_auditor.__path__, "cxr_auditor.")]
        for name in names:
            importlib.import_module(name)
        print("IMPORTED", len(names))
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED" in proc.stdout


def test_blocker_really_hides_a_module() -> None:
    proc = _run(_DICOM, "import pydicom\n")
    assert proc.returncode != 0
    assert "hidden from the audit core" in proc.stderr
