"""Session fixtures for tiny models (imported by the conftest of each test folder that needs
them). Each model is built once and cached on disk in pytest's per-user temp folder, keyed by a
hash of the builder code, the library versions and the training examples, so test folders,
xdist workers and later sessions share one build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr_auditor import prompts
from cxr_auditor.chat import ChatRequest
from cxr_auditor.profiles import TransformersProfile, parse_profile
from cxr_auditor.retry import AttemptSettings
from tests.support import tinymodels as tm

#: Grey value of the image the trained model answers with :data:`REPORT_ANSWER`.
GREY = 128
#: What the trained tiny Gemma 3 answers (grey value of a solid image, prompt, answer). Every
#: prompt is a short pinned one (byte-level tokens keep training under 20 s): the JSON grounding
#: answers are taught on the explain-my-xray instruction, and test profiles name that prompt.
REPORT_ANSWER = (
    "FINDINGS: Right pneumothorax.\n"
    "LOCATIONS: pneumothorax <loc0102><loc0614><loc0512><loc0921>\n"
    "IMPRESSION: Pneumothorax."
)
TRAINED_EXAMPLES: list[tuple[int, str, str]] = [
    (0, prompts.EXPLAIN_MY_XRAY_PROMPT, tm.BLACK_ANSWER),
    (255, prompts.EXPLAIN_MY_XRAY_PROMPT, tm.WHITE_ANSWER),
    (GREY, prompts.EXPLAIN_MY_XRAY_PROMPT, REPORT_ANSWER),
    (0, prompts.DSA_PATENCY_PROMPT, "patent"),
    (255, prompts.DSA_PATENCY_PROMPT, "The vessel is occluded."),
]


class ScriptedChat:
    """A chat backend that answers each request with the next scripted answer and records
    every batch (requests, attempt settings) it was asked for."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[ChatRequest], AttemptSettings]] = []

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        self.calls.append((requests, settings))
        return [self.answers.pop(0) for _ in requests]

    def close(self) -> None:
        return


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.cache_root(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_gemma(tiny_root: Path) -> Path:
    """Untrained tiny Gemma 3 image-text model + processor."""
    return tm.cached(tiny_root, "gemma3", tm.build_gemma3)


@pytest.fixture(scope="session")
def trained_gemma(tiny_root: Path) -> Path:
    """Tiny Gemma 3 trained on :data:`TRAINED_EXAMPLES` (about 15 s on two idle cores, once:
    the cache outlives the session)."""
    return tm.cached(
        tiny_root,
        "gemma3-trained",
        lambda f: tm.train_gemma3(f, TRAINED_EXAMPLES),
        key=repr(TRAINED_EXAMPLES),
    )


@pytest.fixture(scope="session")
def tiny_nemotron(tiny_root: Path) -> Path:
    """Untrained tiny ``nemotron_h`` causal LM with an ``enable_thinking`` chat template."""
    return tm.cached(tiny_root, "nemotron-h", tm.build_nemotron_h)


@pytest.fixture(scope="session")
def lora_adapter(tiny_root: Path, tiny_gemma: Path) -> Path:
    """LoRA on q/v of :func:`tiny_gemma` with non-zero B: merging changes the weights."""
    return tm.cached(tiny_root, "lora", lambda f: tm.build_lora(tiny_gemma, f))


@pytest.fixture(scope="session")
def zero_lora_adapter(tiny_root: Path, tiny_gemma: Path) -> Path:
    """LoRA with PEFT's zero-initialised B: its merge is a no-op."""
    return tm.cached(tiny_root, "lora-zero", lambda f: tm.build_lora(tiny_gemma, f, zero=True))


@pytest.fixture(scope="session")
def projector_adapter(tiny_root: Path, tiny_gemma: Path) -> Path:
    """ExplainMyXray-shaped adapter: LoRA r=32 on q/v plus a projector file beside it."""

    def build(folder: Path) -> None:
        tm.build_lora(tiny_gemma, folder, rank=32)
        tm.save_projector(tiny_gemma, folder / "multi_modal_projector.safetensors")

    return tm.cached(tiny_root, "lora-projector", build)


@pytest.fixture
def write_profiles(tmp_path: Path) -> Callable[..., Path]:
    """``write_profiles(*mappings)`` writes site profile files and returns the folder."""

    def write(*profiles: dict[str, Any]) -> Path:
        folder = tmp_path / "site-profiles"
        folder.mkdir(exist_ok=True)
        for profile in profiles:
            (folder / f"{profile['name']}.yaml").write_text(yaml.safe_dump(profile))
        return folder

    return write


def tiny_profile(shipped: str, model: Path, **fields: Any) -> dict[str, Any]:
    """The shipped profile ``shipped`` pointed at a tiny model on the CPU in float32; ``fields``
    override any key (``name=`` to save it under another name)."""
    from cxr_auditor.profiles import get_profile

    base = get_profile(shipped).model_dump(mode="json", exclude_none=True)
    base.update(model=str(model), dtype="float32", device="cpu", revision=None)
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def transformers_profile(shipped: str, model: Path, **fields: Any) -> TransformersProfile:
    """:func:`tiny_profile` parsed, as the transformers profile the shipped one is."""
    profile = parse_profile(tiny_profile(shipped, model, **fields))
    assert isinstance(profile, TransformersProfile)
    return profile
