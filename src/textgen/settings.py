"""One typed settings object, read once from ``TEXTGEN_*`` environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from textgen.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/textgen.db"
# 100 MB of video, base64-encoded (4/3), plus room for the rest of the JSON body.
DEFAULT_MAX_BODY_BYTES = 140 * 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    default_rate_limit: int = Field(60, gt=0, description="requests per minute for new accounts")
    default_credits: float = Field(100.0, ge=0)
    credits_per_usd: float = Field(100.0, gt=0)
    models_file: Path | None = None

    local_model_path: Path | None = None
    local_model_instances: int = Field(1, ge=1)
    local_context_tokens: int = Field(4096, ge=256)
    local_threads: int | None = None

    gemini_api_key: str | None = Field(None, validation_alias="GEMINI_API_KEY")
    gemini_base_url: str | None = None
    gemini_api_version: str = "v1beta"
    gemini_timeout_seconds: float = Field(300.0, gt=0)
    gemini_retry_budget_seconds: float = Field(60.0, ge=0)
    gemini_max_attempts: int = Field(5, ge=1)
    gemini_retry_initial_delay_seconds: float = Field(1.0, ge=0)
    gemini_retry_max_delay_seconds: float = Field(30.0, ge=0)
    # Larger requests send their videos through the File API (Gemini's inline limit, base64 included).
    gemini_inline_request_bytes: int = Field(100_000_000, gt=0)
    gemini_file_poll_seconds: float = Field(1.0, gt=0)
    gemini_file_active_timeout_seconds: float = Field(600.0, gt=0)

    run_worker: bool = True
    worker_concurrency: int = Field(4, ge=1)
    worker_poll_seconds: float = Field(1.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    shutdown_timeout_seconds: float = Field(30.0, ge=0)

    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)

    list_max_limit: int = Field(100, ge=1)
    sync_timeout_seconds: float = Field(600.0, gt=0)
    stream_keepalive_seconds: float = Field(15.0, gt=0)

    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(15.0, gt=0)
    webhook_schedule: str = "0,5,300,1800,7200,18000,36000,36000,36000,36000,36000,36000,36000"
    webhook_secret_grace_seconds: float = Field(86400.0, ge=0)
    webhook_jitter: float = Field(0.1, ge=0, lt=1, description="spread of each retry delay, as a fraction")
    webhook_concurrency: int = Field(16, ge=1, description="webhook attempts in flight per process")
    webhook_poll_seconds: float = Field(1.0, gt=0, description="polling for deliveries queued elsewhere")

    log_level: str = "info"

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @cached_property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @cached_property
    def webhook_delays(self) -> list[float]:
        return [float(x) for x in self.webhook_schedule.split(",") if x.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the settings, failing fast with a message that names the bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"TEXTGEN_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from exc
