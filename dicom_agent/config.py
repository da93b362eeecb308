"""Agent settings: one pydantic-settings class, sources in a fixed order.

Order (first wins): init arguments, environment (``CXR_AGENT__SECTION__KEY``, nested with
``__``), the file given with ``--config`` (or ``CXR_AGENT_CONFIG``), the embedded defaults in
``config/agent.yaml``, then the field defaults below. Relative paths are resolved against the
current working directory. Every key is documented in docs/config.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_agent.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_CONFIG = PACKAGE_ROOT / "config" / "agent.yaml"
EMBEDDED_PROFILES = PACKAGE_ROOT / "config" / "profiles"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae(value: str) -> str:
    if not value.strip() or not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable characters without backslash (PS3.5 AE)")
    return value.strip()


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost`` (what only this machine can reach)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(default=None, description="CA that signs client certificates")
    require_client_cert: bool = True


class _AssociationTimeouts(_Section):
    """The waits of a DICOM association (pynetdicom's ACSE, DIMSE and network timeouts)."""

    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)


class SCPSettings(_AssociationTimeouts):
    ae_title: str = "CXRAUDIT"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    max_associations_per_address: int = Field(
        default=8, ge=1, description="associations one peer address may hold at once"
    )
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    read_timeout_seconds: float = Field(
        default=30.0, gt=0, description="one PDU, or the TLS handshake, must arrive within this"
    )
    max_instance_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    sync_step_bytes: int = Field(
        default=1 << 20,
        ge=0,
        description="a data set being received is fdatasync'ed every this many bytes, so the "
        "disk flush runs while the rest arrives (0: one fsync at the end, for spinning disks)",
    )
    overwrite: Literal["keep_first", "replace"] = "keep_first"
    unknown_sop_class: Literal["reject", "ignore"] = "reject"
    workers: int = Field(default=1, ge=1, description="listener processes sharing the port")
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]


class PathSettings(_Section):
    spool: Path = Path("var/spool")
    drafts: Path = Path("var/drafts")
    out: Path = Path("var/out")
    state: Path = Path("var/state/agent.sqlite3")
    quarantine: Path = Path("var/quarantine")
    finals: Path = Path("var/finals")
    profiles: Path | None = None


class PairingSettings(_Section):
    settle_seconds: float = Field(default=10.0, ge=0)
    draft_wait_seconds: float = Field(default=300.0, ge=0)
    study_wait_seconds: float = Field(default=3600.0, ge=0)
    no_draft_policy: Literal["image_only", "wait"] = "image_only"
    poll_seconds: float = Field(default=1.0, gt=0)


class WorkerSettings(_Section):
    batch_size: int = Field(default=8, ge=1)
    batch_wait_seconds: float = Field(default=0.5, ge=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=3600.0, ge=0)
    job_timeout_seconds: float = Field(default=600.0, gt=0)
    model_retry_seconds: float = Field(default=60.0, gt=0)


class GroundingSettings(_Section):
    profile: str = "cxr-auditor-v2"
    input_size: int = Field(default=896, ge=16)
    xa_profile: str | None = Field(
        default=None, description="classification profile for XA studies (e.g. dsa-patency)"
    )


class DraftSettings(_Section):
    parser: str = "rules"
    max_bytes: int = Field(default=256 * 1024, gt=0)
    stable_seconds: float = Field(default=1.0, ge=0)
    poll_seconds: float = Field(default=1.0, gt=0)


class AuditSettings(_Section):
    urgent_labels: list[str] = Field(default_factory=lambda: ["pneumothorax", "nodule_mass"])
    mode: Literal["QA", "Research"] = "Research"


class OutputSettings(_Section):
    json_sidecar: bool = True
    overlay_png: bool = True
    sr: bool = True
    gsps: bool = True
    secondary_capture: bool = True
    series_number_sr: int = 9901
    series_number_gsps: int = 9902
    series_number_sc: int = 9903


class Destination(_Section):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    research: bool = Field(
        default=False, description="only destinations marked research receive results"
    )
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class ForwardSettings(_AssociationTimeouts):
    enabled: bool = False
    calling_ae_title: str = "CXRAUDIT"
    destinations: list[Destination] = Field(default_factory=list)
    max_attempts: int = Field(default=20, ge=1)
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=3600.0, ge=0)
    # pynetdicom's own defaults leave the TCP connect unbounded and the socket without a
    # timeout once connected; every wait of the SCU is bounded by this or an association
    # timeout (acse, dimse, network: :class:`_AssociationTimeouts`).
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    job_timeout_seconds: float = Field(
        default=900.0, gt=0, description="watchdog: a forward job still sending after this fails"
    )


class HousekeepingSettings(_Section):
    spool_retention_days: float = Field(default=30.0, ge=0)
    results_retention_days: float = Field(default=365.0, ge=0)
    failed_retention_days: float = Field(
        default=30.0, ge=0, description="spool files of studies whose audit is dead-lettered"
    )
    unpaired_retention_days: float = Field(
        default=30.0, ge=0, description="spool files of studies still waiting for a draft"
    )
    quarantine_retention_days: float = Field(default=30.0, ge=0)
    interval_seconds: float = Field(default=3600.0, gt=0)


class LoggingSettings(_Section):
    level: str = "INFO"  # the agent's own loggers (dicom_agent, cxr_auditor)
    # Every other logger: pynetdicom, highdicom and pydicom log identifiers at INFO/DEBUG.
    library_level: str = "WARNING"
    json_lines: bool = False


class MonitoringSettings(_Section):
    """Monitoring against signed final reports dropped in ``paths.finals``."""

    enabled: bool = True
    poll_seconds: float = Field(default=5.0, gt=0)
    window_cases: int = Field(
        default=200, ge=1, description="newest agreements per label and profile in the window"
    )


class HealthSettings(_Section):
    """The HTTP server: health, metrics and the results browser (docs/browser.md)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_connections: int = Field(
        default=32, ge=1, description="open connections at once; more are answered 503"
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="a connection that sends no complete request is closed"
    )
    keep_alive_seconds: float = Field(default=5.0, gt=0)
    min_free_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="/readyz fails below this free space"
    )


class WebSettings(_Section):
    """The results browser, served on the health port."""

    enabled: bool = True
    auth: Literal["none", "token", "basic"] = "none"
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    allow_without_login: bool = Field(
        default=False,
        description="pages without a login off loopback: only where the port is published on"
        " the host's loopback alone (the container of compose.yaml)",
    )
    show_patient_identity: bool = False
    keep_uploads: bool = False
    uploads: Path = Path("var/uploads")
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    page_size: int = Field(default=50, ge=1, le=500)

    @model_validator(mode="after")
    def _credentials(self) -> WebSettings:
        if self.auth == "token" and not self.token:
            raise ValueError("web.auth token needs web.token")
        if self.auth == "basic" and not (self.username and self.password):
            raise ValueError("web.auth basic needs web.username and web.password")
        return self


class OpenAISettings(_Section):
    api_key: SecretStr | None = None


class AgentSettings(BaseSettings):
    """All agent settings. See the module docstring for the source order."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_AGENT__", env_nested_delimiter="__", extra="forbid"
    )

    scp: SCPSettings = Field(default_factory=SCPSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    pairing: PairingSettings = Field(default_factory=PairingSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    grounding: GroundingSettings = Field(default_factory=GroundingSettings)
    drafts: DraftSettings = Field(default_factory=DraftSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    housekeeping: HousekeepingSettings = Field(default_factory=HousekeepingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    web: WebSettings = Field(default_factory=WebSettings)

    @model_validator(mode="after")
    def _web_exposure(self) -> AgentSettings:
        # The pages show studies and drafts and start audits: off loopback they need a login.
        if (
            self.health.enabled
            and self.web.enabled
            and self.web.auth == "none"
            and not self.web.allow_without_login
            and not is_loopback(self.health.host)
        ):
            raise ValueError(
                f"health.host {self.health.host} is not loopback: set web.auth to token or basic"
                " (or web.enabled false)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = [EMBEDDED_CONFIG]
        extra = os.environ.get("CXR_AGENT_CONFIG")
        if extra:
            files.append(Path(extra))
        return (init_settings, env_settings, _YamlFiles(settings_cls, files))

    def folders(self) -> dict[str, Path]:
        """The writable folders the agent owns (state's parent included)."""
        p = self.paths
        return {
            "spool": p.spool,
            "drafts": p.drafts,
            "out": p.out,
            "state": p.state.parent,
            "quarantine": p.quarantine,
            "finals": p.finals,
        }

    def ensure_folders(self) -> None:
        for name, folder in self.folders().items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"paths.{name}: cannot create {folder}: {exc.strerror}") from exc


class _YamlFiles(PydanticBaseSettingsSource):
    """YAML files merged in order; later files override earlier ones key by key."""

    def __init__(self, settings_cls: type[BaseSettings], files: list[Path]) -> None:
        super().__init__(settings_cls)
        self.files = files

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for path in self.files:
            merged = deep_merge(merged, _read_yaml(path))
        return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at its top level")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` key by key (nested mappings merge, other values replace)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Load settings, turning every validation problem into one ConfigError line per bad key."""
    old = os.environ.get("CXR_AGENT_CONFIG")
    try:
        if config_file is not None:
            os.environ["CXR_AGENT_CONFIG"] = str(config_file)
        return AgentSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            # a check across sections (model validator) names its keys in the message
            lines.append(f"config key {key}: {msg}" if key else f"config: {msg}")
        raise ConfigError("\n".join(lines)) from None
    finally:
        if config_file is not None:
            if old is None:
                os.environ.pop("CXR_AGENT_CONFIG", None)
            else:
                os.environ["CXR_AGENT_CONFIG"] = old
