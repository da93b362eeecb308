"""Model profiles: which model does a task, how to reach it, and which studies it serves.

A profile is one YAML file in ``config/profiles/`` (shipped) or in the site folder
``paths.profiles`` (a site file overrides a shipped one of the same ``name``). ``backend`` picks
the variant of a discriminated union, so a validation error names the variant that failed:

* ``transformers``: the model runs in this process (CUDA when present, CPU otherwise);
* ``openai``: an OpenAI-compatible chat-completions server (vLLM, SGLang) serves it;
* ``fake``: canned answers for dry runs and tests;
* ``rules``: the deterministic rule-based draft parser (no model at all).

Routing rules match the DICOM attributes Modality (0008,0060), SOP Class UID (0008,0016),
Body Part Examined (0018,0015) and View Position (0018,5101) (PS3.3 C.7.3.1, C.8.11.5).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from cxr_auditor.errors import ProfileError
from cxr_auditor.labels import Label
from cxr_auditor.prompts import PROMPTS, prompt_hash
from cxr_auditor.schema import ModelInfo

__all__ = [
    "PARSER_TASKS",
    "PATENCY_LABELS",
    "SHIPPED_PROFILES",
    "FakeProfile",
    "Generation",
    "OpenAIProfile",
    "Profile",
    "RoutingRule",
    "RulesProfile",
    "Sampling",
    "TransformersProfile",
    "get_profile",
    "load_profiles",
    "model_info",
    "parse_profile",
    "profile_prompt",
    "read_profile",
]

logger = logging.getLogger(__name__)

#: Profiles shipped with the package (a source checkout keeps them beside the packages).
SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "config" / "profiles"

Task = Literal["grounding", "draft_parsing", "classification"]

#: Output parsers a profile can name, and the task each one serves.
PARSER_TASKS: dict[str, str] = {
    "grounding_json": "grounding",
    "report_loc": "grounding",
    "draft_json": "draft_parsing",
    "patency": "classification",
}

#: Answers a classification profile can map terms onto.
PATENCY_LABELS = frozenset({"patent", "blocked"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Model):
    """Sampling used by the last rung of the retry ladder (CONTRACT.md)."""

    temperature: float = Field(default=0.4, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)


class Generation(_Model):
    """Generation parameters; ``retries`` is the number of attempts after the first."""

    max_new_tokens: int = Field(default=512, ge=1)
    retries: int = Field(default=2, ge=0)
    sampling: Sampling = Field(default_factory=Sampling)
    enable_thinking: bool | None = Field(
        default=None, description="passed to the chat template when set (Nemotron reasoning)"
    )
    batch_size: int = Field(default=8, ge=1, description="images or drafts per generate call")

    @property
    def max_attempts(self) -> int:
        return self.retries + 1


class RoutingRule(_Model):
    """One rule: every non-empty list must contain the instance's value (case-insensitive)."""

    modality: list[str] = Field(default_factory=list)
    sop_class_uid: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)

    def matches(
        self,
        modality: str | None,
        sop_class_uid: str | None,
        body_part: str | None,
        view_position: str | None,
    ) -> bool:
        pairs = (
            (self.modality, modality),
            (self.sop_class_uid, sop_class_uid),
            (self.body_part, body_part),
            (self.view_position, view_position),
        )
        for allowed, value in pairs:
            if allowed and (value is None or value.strip().upper() not in _upper(allowed)):
                return False
        return True


def _upper(values: list[str]) -> set[str]:
    return {v.strip().upper() for v in values}


class _ProfileBase(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    task: Task
    description: str = ""
    model: str | None = Field(default=None, description="hub id or local folder")
    revision: str | None = None
    adapter: str | None = Field(default=None, description="PEFT adapter: hub id or folder")
    prompt: str | None = Field(default=None, description="name in cxr_auditor.prompts.PROMPTS")
    parser: str | None = None
    labels: dict[str, str] = Field(
        default_factory=dict, description="extra output term -> label mapping"
    )
    generation: Generation = Field(default_factory=Generation)
    routing: list[RoutingRule] = Field(
        default_factory=list, description="any rule matching routes an instance; none = all"
    )

    @model_validator(mode="after")
    def _parser_fits_task(self) -> _ProfileBase:
        if self.prompt is not None and self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(PROMPTS)}")
        allowed = PATENCY_LABELS if self.task == "classification" else {str(x) for x in Label}
        bad = sorted(v for v in self.labels.values() if v not in allowed)
        if bad:
            raise ValueError(f"labels values must be among {sorted(allowed)}")
        if self.parser is not None:
            if self.parser not in PARSER_TASKS:
                raise ValueError(f"parser must be one of {sorted(PARSER_TASKS)}")
            if PARSER_TASKS[self.parser] != self.task:
                raise ValueError(
                    f"parser {self.parser!r} serves task {PARSER_TASKS[self.parser]!r}, "
                    f"not {self.task!r}"
                )
        return self

    def routes(
        self,
        modality: str | None,
        sop_class_uid: str | None = None,
        body_part: str | None = None,
        view_position: str | None = None,
    ) -> bool:
        """True when this profile serves an instance with these attributes."""
        if not self.routing:
            return True
        return any(r.matches(modality, sop_class_uid, body_part, view_position) for r in self.routing)

    @property
    def output_parser(self) -> str:
        """The parser in effect (explicit, or the task's default)."""
        if self.parser is not None:
            return self.parser
        return {
            "grounding": "grounding_json",
            "draft_parsing": "draft_json",
            "classification": "patency",
        }[self.task]


class TransformersProfile(_ProfileBase):
    """A model run in-process with transformers (lazy imports; see :mod:`cxr_auditor.models`)."""

    backend: Literal["transformers"]
    model: str
    model_class: Literal["image_text_to_text", "causal_lm"] = "image_text_to_text"
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    load_in_4bit: bool = Field(default=False, description="bitsandbytes NF4; GPU only")
    projector: str | None = Field(
        default=None,
        description="multi-modal projector weights file inside the adapter folder/repo",
    )
    min_merge_delta: float = Field(
        default=1e-6, ge=0, description="smallest max |delta| that proves an adapter merge"
    )
    keep_tokens: list[str] = Field(
        default_factory=list,
        description="regex of added tokens kept when decoding (e.g. '<loc\\d{4}>')",
    )

    @model_validator(mode="after")
    def _adapter_base(self) -> TransformersProfile:
        if self.adapter and self.load_in_4bit:
            raise ValueError("an adapter is merged on a bf16 base, never a 4-bit one")
        if self.projector and not self.adapter:
            raise ValueError("'projector' names a file of the adapter; set 'adapter'")
        for pattern in self.keep_tokens:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"keep_tokens: invalid pattern ({exc})") from None
        return self


class OpenAIProfile(_ProfileBase):
    """A model behind an OpenAI-compatible chat-completions server.

    ``model`` is the served model name; a LoRA adapter registered on the server is selected by
    its served name the same way. The API key is read from the environment variable
    ``api_key_env`` at use time and never stored on the profile.
    """

    backend: Literal["openai"]
    model: str
    base_url: str = Field(pattern=r"^https?://")
    api_key_env: str | None = None
    timeout_seconds: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, description="retries on 5xx / connection errors")
    backoff_seconds: float = Field(default=1.0, ge=0)
    concurrency: int = Field(default=4, ge=1)
    structured_output: Literal["none", "response_format", "guided_json"] = "none"


class FakeProfile(_ProfileBase):
    """Canned answers for dry runs and tests: no model, no GPU."""

    backend: Literal["fake"]


class RulesProfile(_ProfileBase):
    """The deterministic rule-based draft parser (CONTRACT.md "Draft parsing")."""

    backend: Literal["rules"]

    @model_validator(mode="after")
    def _draft_only(self) -> RulesProfile:
        if self.task != "draft_parsing":
            raise ValueError("backend 'rules' only parses drafts (task: draft_parsing)")
        return self


Profile = Annotated[
    TransformersProfile | OpenAIProfile | FakeProfile | RulesProfile,
    Field(discriminator="backend"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Profile)


def parse_profile(data: dict[str, Any], source: str = "<dict>") -> Profile:
    """Validate one profile mapping; errors name the file, the backend variant and the key."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"{source}: {key}: {err['msg']}")
        raise ProfileError("\n".join(lines)) from None


def read_profile(path: Path) -> Profile:
    """Read and validate one profile YAML file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a mapping")
    return parse_profile(data, str(path))


def _read_dir(folder: Path) -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        profile = read_profile(path)
        if profile.name in out:
            raise ProfileError(f"{path}: profile name {profile.name!r} is defined twice in {folder}")
        out[profile.name] = profile
    return out


def load_profiles(extra_dir: Path | None = None) -> dict[str, Profile]:
    """Shipped profiles, then the site folder's (same name: the site's wins)."""
    profiles = _read_dir(SHIPPED_PROFILES)
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise ProfileError(f"paths.profiles: {extra_dir} is not a folder")
        site = _read_dir(extra_dir)
        for name in site.keys() & profiles.keys():
            logger.info("profile %s: the site folder's file overrides the shipped one", name)
        profiles.update(site)
    return profiles


def get_profile(name: str, extra_dir: Path | None = None) -> Profile:
    """The profile called ``name``; ProfileError lists the known names when there is none."""
    profiles = load_profiles(extra_dir)
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(f"unknown profile {name!r}; known profiles: {known}") from None


def profile_prompt(profile: Profile, default: str) -> str:
    """The prompt text the profile names (or the task's default prompt)."""
    return PROMPTS[profile.prompt or default]


def model_info(profile: Profile, prompt: str | None) -> ModelInfo:
    """Provenance of a profile for ``AuditResult.models``: the model it names and the hash of
    the prompt it runs."""
    return ModelInfo(
        profile=profile.name,
        task=profile.task,
        backend=profile.backend,
        model_id=profile.model,
        revision=profile.revision,
        adapter=profile.adapter,
        prompt_hash=prompt_hash(prompt) if prompt is not None else None,
    )
