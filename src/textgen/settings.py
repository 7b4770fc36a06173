"""One typed settings object, read once from ``TEXTGEN_*`` environment variables."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from textgen.errors import ConfigurationError
from textgen.limits import MAX_CREDITS, MAX_RATE_LIMIT

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/textgen.db"
# 100 MB of video, base64-encoded (4/3), plus room for the rest of the JSON body.
DEFAULT_MAX_BODY_BYTES = 140 * 1024 * 1024
# Room for a few bodies at the size limit at once.
DEFAULT_REQUEST_BODIES_BUDGET_BYTES = 512 * 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore", frozen=True)

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="`sqlite+aiosqlite:///PATH` (embedded default) or `postgresql+asyncpg://USER@HOST/DB`",
    )
    redis_url: str | None = Field(
        None, description="`redis://HOST:6379/0`: share rate limits between processes (else per process)"
    )
    host: str = Field("127.0.0.1", description="address `textgen serve` listens on")
    port: int = Field(8000, ge=1, le=65535, description="port `textgen serve` listens on")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )

    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description="largest request body (413 above); fits a 100 MB video in base64",
    )
    request_bodies_budget_bytes: int = Field(
        DEFAULT_REQUEST_BODIES_BUDGET_BYTES,
        gt=0,
        description="request bodies one process holds at once, in all (each from its first byte, or its "
        "Content-Length, until it is answered); a request past it is answered 503 with Retry-After; at least "
        "TEXTGEN_MAX_BODY_BYTES",
    )
    admin_token: str | None = Field(
        None,
        description="enables the admin API and usage page under `/admin/` and guards `GET /metrics` "
        "(a bearer token; keep it secret)",
    )
    auth_cache_seconds: float = Field(
        2.0,
        ge=0,
        le=60,
        description="how long a process trusts a checked API key: a key revoked or account disabled "
        "elsewhere stops working here within this bound",
    )
    auth_failures_per_minute: int = Field(
        30,
        gt=0,
        description="failed authentications per minute from one client address; past it the address is "
        "answered 429 with Retry-After (a key this process has just checked as valid still works)",
    )
    default_rate_limit: int = Field(
        60, ge=1, le=MAX_RATE_LIMIT, description="requests per minute of new accounts (1 to 1,000,000,000)"
    )
    default_credits: float = Field(
        100.0, ge=0, le=MAX_CREDITS, allow_inf_nan=False, description="credits of new accounts (at most 1e12)"
    )
    credits_per_usd: float = Field(
        100.0, gt=0, allow_inf_nan=False, description="credits charged per USD of model list price"
    )
    models_file: Path | None = Field(
        None, description="TOML file of extra or overriding models and prices (format of `models.toml`)"
    )
    default_max_output_tokens: int | None = Field(
        None,
        ge=1,
        description="output budget of a request without `config.max_output_tokens`, sent upstream and reserved "
        "for, for every model (at most its maximum); unset: each model's `default_output_tokens` "
        "(Gemini 8192, the embedded model 512)",
    )
    list_max_limit: int = Field(100, ge=1, description="largest `?limit=` of the task list")
    sync_timeout_seconds: float = Field(
        600.0, gt=0, description="a sync request that takes longer fails with a timeout"
    )
    generation_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="a generation (any model; queued, sync or streamed) still running after this long is "
        "stopped: the task fails saying so and is charged for what it produced",
    )
    stream_keepalive_seconds: float = Field(
        15.0, gt=0, description="keep-alive comment interval while a stream is silent"
    )

    local_model_path: Path | None = Field(
        None, description="GGUF chat model to serve as `smollm2-135m-instruct` (default: the bundled SmolLM2)"
    )
    local_model_instances: int | None = Field(
        None, ge=1, description="embedded model instances (default: one per two CPU cores, at most 8)"
    )
    local_context_tokens: int = Field(4096, ge=256, description="context window of each instance")
    local_threads: int | None = Field(
        None, ge=1, description="CPU threads per instance (default: cores / instances)"
    )

    gemini_api_key: str | None = Field(
        None,
        validation_alias="GEMINI_API_KEY",
        description="enables the Gemini models (read from `GEMINI_API_KEY`)",
    )
    gemini_base_url: str | None = Field(None, description="Gemini API base URL (a proxy, or a test server)")
    gemini_api_version: str = Field("v1beta", description="Gemini API version")
    gemini_timeout_seconds: float = Field(300.0, gt=0, description="timeout of one Gemini call")
    gemini_retry_budget_seconds: float = Field(60.0, ge=0, description="total time retries may take")
    gemini_concurrency: int = Field(
        512, ge=1, description="Gemini generations in flight per process (sync, stream and queued together)"
    )
    gemini_max_attempts: int = Field(5, ge=1, description="attempts per Gemini call, the first included")
    gemini_retry_initial_delay_seconds: float = Field(1.0, ge=0, description="first backoff delay")
    gemini_retry_max_delay_seconds: float = Field(30.0, ge=0, description="longest backoff delay")
    gemini_inline_request_bytes: int = Field(
        100_000_000, gt=0, description="requests larger than this send their videos through the File API"
    )
    gemini_file_poll_seconds: float = Field(
        1.0, gt=0, description="File API: interval of upload state checks"
    )
    gemini_file_active_timeout_seconds: float = Field(
        600.0, gt=0, description="File API: how long an upload may take to become active"
    )

    run_worker: bool = Field(True, description="`textgen serve` also runs the task worker and webhook sender")
    worker_concurrency: int | None = Field(
        None,
        ge=1,
        description="optional cap on queued tasks in flight per process; unset: each provider's capacity "
        "(TEXTGEN_GEMINI_CONCURRENCY, TEXTGEN_LOCAL_MODEL_INSTANCES)",
    )
    worker_claim_batch: int = Field(64, ge=1, description="most tasks one claim takes, per provider")
    task_max_attempts: int = Field(
        3, ge=1, description="a task claimed this many times without finishing (its process died) fails"
    )
    worker_poll_seconds: float = Field(
        1.0, gt=0, description="queue polling interval (woken at once by new tasks in-process or via NOTIFY)"
    )
    claim_interval_seconds: float = Field(
        0.02,
        ge=0,
        le=1,
        description="least time between two claims of a task worker or webhook sender; the wake-ups in "
        "between share one claim (on PostgreSQL every process is woken by every task and delivery queued)",
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="a running task whose worker stops renewing it for this long is run again"
    )
    shutdown_timeout_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, in-flight tasks get this long before they are released"
    )
    idempotency_ttl_seconds: float = Field(
        86400.0, gt=0, description="an Idempotency-Key answers with its first task for this long (24 h)"
    )
    readiness_timeout_seconds: float = Field(
        2.0, gt=0, description="`GET /readyz` gives each check (database, Redis, providers) this long"
    )
    db_pool_size: int = Field(10, ge=1, description="PostgreSQL connections per process")
    db_max_overflow: int = Field(10, ge=0, description="extra PostgreSQL connections under load")

    webhook_allow_private: bool = Field(
        False, description="allow webhook URLs on loopback/private networks (development, tests)"
    )
    webhook_refused_ports: str = Field(
        "0,22,23,25,53,111,135,139,445,2049,2375,2376,2379,3306,5432,5672,6379,9200,11211,27017",
        description="comma-separated ports a webhook URL may not use (internal services); empty for none",
    )
    webhook_timeout_seconds: float = Field(15.0, gt=0, description="timeout of one webhook attempt")
    webhook_schedule: str = Field(
        "0,5,300,1800,7200,18000,36000,36000,36000,36000,36000,36000,36000",
        description="delays in seconds before each webhook attempt (about 3 days in all)",
    )
    webhook_secret_grace_seconds: float = Field(
        86400.0, ge=0, description="after a rotation, the previous signing secret keeps signing this long"
    )
    webhook_jitter: float = Field(0.1, ge=0, lt=1, description="spread of each retry delay, as a fraction")
    webhook_concurrency: int = Field(64, ge=1, description="webhook attempts in flight per process")
    webhook_poll_seconds: float = Field(1.0, gt=0, description="polling for deliveries queued elsewhere")
    webhook_max_redeliveries: int = Field(
        5,
        ge=0,
        description="manual redeliveries allowed per task (`POST …/webhooks/redeliver/`; 409 past it)",
    )

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("request_bodies_budget_bytes")
    @classmethod
    def _room_for_one_body(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_body_bytes")
        if largest is not None and value < largest:
            raise ValueError(
                f"must be at least TEXTGEN_MAX_BODY_BYTES ({largest}), or a body at the size limit can never "
                f"be read"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("gemini_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("local_model_path")
    @classmethod
    def _gguf_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        try:
            with value.open("rb") as file:
                magic = file.read(4)
        except OSError as exc:
            raise ValueError(f"cannot read the file ({exc.strerror or exc})") from None
        if magic != b"GGUF":
            raise ValueError("must be a GGUF model file")
        return value

    @field_validator("models_file")
    @classmethod
    def _catalog_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            from textgen.catalog import load_catalog

            try:
                load_catalog(value)
            except ConfigurationError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("webhook_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        _delays(value)
        return value

    @field_validator("webhook_refused_ports")
    @classmethod
    def _port_list(cls, value: str) -> str:
        _ports(value)
        return value

    @cached_property
    def webhook_refused_port_set(self) -> frozenset[int]:
        return _ports(self.webhook_refused_ports)

    @cached_property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @cached_property
    def webhook_delays(self) -> list[float]:
        return _delays(self.webhook_schedule)


def _delays(text: str) -> list[float]:
    delays = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            delay = float(item)
        except ValueError:
            delay = math.nan
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"must be comma-separated delays in seconds (numbers >= 0), got {item!r}")
        delays.append(delay)
    if not delays:
        raise ValueError("must list at least one delay in seconds")
    return delays


def _ports(text: str) -> frozenset[int]:
    ports = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) > 65535:
            raise ValueError(f"must be comma-separated port numbers (0-65535), got {item!r}")
        ports.add(int(item))
    return frozenset(ports)


# Values that may carry a password or a key: a message names the variable, never repeats its value.
_SECRET_FIELDS = {"database_url", "redis_url", "admin_token", "gemini_api_key"}


def load_settings(**overrides: object) -> Settings:
    """Read the settings, failing fast with one line that names each bad variable and what it allows."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors(include_url=False))
        raise ConfigurationError(f"invalid configuration: {problems}") from None


def _problem(error: Any) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    name = env_name(field) if field else "TEXTGEN"
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    shown = field and field not in _SECRET_FIELDS and isinstance(given, str | int | float)
    if shown and "got " not in message:
        message += f" (got {str(given)!r})"
    return f"{name}: {message}"


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else f"TEXTGEN_{field.upper()}"


def settings_table() -> str:
    """The README's table of settings, generated from the fields above."""
    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = "" if default is None else f"`{default}`"
        rows.append(f"| `{env_name(name)}` | {shown} | {info.description or ''} |")
    return "\n".join(rows)
