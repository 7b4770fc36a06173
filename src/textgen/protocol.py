"""Request and response schemas of the public API (pydantic v2; the OpenAPI document is built from them)."""

from __future__ import annotations

import datetime as dt
import math
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from textgen import limits, media
from textgen.states import TaskStatus

MAX_MESSAGES = limits.MAX_MESSAGES
MAX_URL_LENGTH = limits.MAX_URL_LENGTH
FUNCTION_NAME_PATTERN = limits.FUNCTION_NAME_PATTERN


def _finite(value: Any) -> Any:
    """Refuse NaN and infinities anywhere in a free-form value: JSON has no such numbers."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (NaN and Infinity are not JSON)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Role(StrEnum):
    user = "user"
    model = "model"


class ResponseMimeType(StrEnum):
    text_plain = "text/plain"
    application_json = "application/json"


class FunctionCallingMode(StrEnum):
    AUTO = "AUTO"
    ANY = "ANY"
    NONE = "NONE"
    VALIDATED = "VALIDATED"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image"]
    data: str = Field(description="base64-encoded image bytes")
    mime_type: str

    @model_validator(mode="after")
    def _valid_media(self) -> ImagePart:
        media.check_media("image", self.mime_type, self.data)
        return self


class VideoPart(_Strict):
    type: Literal["video"]
    data: str = Field(description="base64-encoded video bytes")
    mime_type: str

    @model_validator(mode="after")
    def _valid_media(self) -> VideoPart:
        media.check_media("video", self.mime_type, self.data)
        return self


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCallPart(_Strict):
    """A function call issued by the model."""

    name: str = Field(max_length=limits.MAX_FUNCTION_NAME_LENGTH)
    args: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(None, max_length=limits.MAX_CALL_ID_LENGTH)
    thought_signature: str | None = Field(
        None, description="Opaque signature returned by Gemini 3; send it back unchanged."
    )


class FunctionResponsePart(_Strict):
    """A function response supplied by the caller."""

    name: str = Field(max_length=limits.MAX_FUNCTION_NAME_LENGTH)
    response: JsonObject
    id: str | None = Field(None, max_length=limits.MAX_CALL_ID_LENGTH)


class Message(_Strict):
    role: Role
    content: str | Annotated[list[ContentPart], Field(max_length=limits.MAX_CONTENT_PARTS)] = ""
    function_call: FunctionCallPart | None = None
    function_response: FunctionResponsePart | None = None

    @model_validator(mode="after")
    def _roles_and_parts(self) -> Message:
        if self.function_call is not None and self.role is not Role.model:
            raise ValueError("function_call is only allowed on messages with role 'model'")
        if self.function_call is not None:
            _finite(self.function_call.args)
        if self.function_response is not None and self.role is not Role.user:
            raise ValueError("function_response is only allowed on messages with role 'user'")
        if self.content in ("", []) and self.function_call is None and self.function_response is None:
            raise ValueError("message has no content, function_call or function_response")
        return self

    def media_kinds(self) -> set[str]:
        if isinstance(self.content, str):
            return set()
        return {part.type for part in self.content if part.type != "text"}

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class TextGenConfig(_Strict):
    """Generation config parameters."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_output_tokens: int | None = Field(
        None,
        ge=1,
        description="Most output tokens (thinking included) to generate, up to the model's maximum; without it "
        "the model's default_output_tokens (GET /sse/models/), which is also what credits are reserved for.",
    )
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    stop_sequences: (
        list[Annotated[str, Field(min_length=1, max_length=limits.MAX_STOP_SEQUENCE_LENGTH)]] | None
    ) = Field(None, max_length=limits.MAX_STOP_SEQUENCES)
    response_mime_type: ResponseMimeType | None = None
    response_json_schema: JsonObject | bool | None = None

    @field_validator("response_json_schema")
    @classmethod
    def _json_schema_needs_json(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("response_mime_type") is ResponseMimeType.text_plain:
            raise ValueError("requires response_mime_type 'application/json' (it is 'text/plain')")
        return value

    @model_validator(mode="after")
    def _json_schema_implies_json(self) -> TextGenConfig:
        if self.response_json_schema is not None:
            self.response_mime_type = ResponseMimeType.application_json
        return self


class FunctionDeclaration(_Strict):
    """Declares a function the model may call."""

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str = ""
    parameters: JsonObject | None = None


class Tool(_Strict):
    function_declarations: list[FunctionDeclaration] = Field(
        min_length=1, max_length=limits.MAX_FUNCTION_DECLARATIONS
    )


class FunctionCallingConfig(_Strict):
    mode: FunctionCallingMode = FunctionCallingMode.AUTO
    allowed_function_names: list[Annotated[str, Field(max_length=limits.MAX_FUNCTION_NAME_LENGTH)]] | None = (
        Field(None, max_length=limits.MAX_FUNCTION_DECLARATIONS)
    )


class ToolConfig(_Strict):
    function_calling_config: FunctionCallingConfig | None = None


class GenerationInput(_Strict):
    """What a model is asked: the create request without delivery options."""

    model_name: str = Field(
        max_length=limits.MAX_MODEL_NAME_LENGTH, description="Name of the model (e.g. gemini-2.5-flash)."
    )
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system_instruction: str = ""
    config: TextGenConfig = Field(default_factory=TextGenConfig)
    tools: list[Tool] = Field(default_factory=list, max_length=limits.MAX_FUNCTION_DECLARATIONS)
    tool_config: ToolConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        limits.check_request(data)  # counts before per-item validation; BadRequest names the field
        return data

    @model_validator(mode="after")
    def _tools_consistent(self) -> GenerationInput:
        names: set[str] = set()
        for declaration in self.function_declarations:
            if declaration.name in names:
                raise ValueError(f"tools: function {declaration.name!r} is declared more than once")
            names.add(declaration.name)
        fcc = self.tool_config.function_calling_config if self.tool_config else None
        if fcc is not None:
            if fcc.mode in (FunctionCallingMode.ANY, FunctionCallingMode.VALIDATED) and not names:
                raise ValueError(
                    f"tool_config: mode {fcc.mode.value} needs at least one function declaration"
                )
            for allowed in fcc.allowed_function_names or []:
                if allowed not in names:
                    raise ValueError(
                        f"tool_config.function_calling_config.allowed_function_names: {allowed!r} is not declared"
                    )
            if fcc.allowed_function_names and fcc.mode not in (
                FunctionCallingMode.ANY,
                FunctionCallingMode.VALIDATED,
            ):
                raise ValueError(
                    "tool_config.function_calling_config.allowed_function_names is only allowed with mode ANY "
                    "or VALIDATED"
                )
        return self

    @property
    def function_declarations(self) -> list[FunctionDeclaration]:
        return [d for tool in self.tools for d in tool.function_declarations]

    @property
    def calling_mode(self) -> FunctionCallingMode:
        fcc = self.tool_config.function_calling_config if self.tool_config else None
        return fcc.mode if fcc else FunctionCallingMode.AUTO

    @property
    def allowed_function_names(self) -> list[str]:
        fcc = self.tool_config.function_calling_config if self.tool_config else None
        if fcc and fcc.allowed_function_names:
            return list(fcc.allowed_function_names)
        return [d.name for d in self.function_declarations]

    def media_kinds(self) -> set[str]:
        kinds: set[str] = set()
        for message in self.messages:
            kinds |= message.media_kinds()
        return kinds


class TextGenRequest(GenerationInput):
    """Body of ``POST /sse/text_generator/``."""

    webhook_url: str | None = Field(None, max_length=MAX_URL_LENGTH, json_schema_extra={"format": "uri"})
    sync: bool = False

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        try:
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError:
            raise ValueError("has an invalid port") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials")
        return value


class StreamRequest(GenerationInput):
    """Body of ``POST /sse/text_generator/stream/``: the create body minus ``sync`` and ``webhook_url``."""

    @model_validator(mode="before")
    @classmethod
    def _no_delivery_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("sync", "webhook_url"):
                if key in data:
                    raise ValueError(f"{key} is not accepted by the streaming endpoint")
        return data


class TextGenResponse(BaseModel):
    id: str = Field(json_schema_extra={"format": "uuid"})
    model_name: str
    messages: list[Message]
    system_instruction: str = ""
    config: TextGenConfig
    status: TaskStatus
    response_text: str = ""
    response_function_calls: list[FunctionCallPart] = Field(default_factory=list)
    failed_reason: str = ""
    credits_used: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    created_at: dt.datetime
    updated_at: dt.datetime


class TaskPage(BaseModel):
    next: str | None
    previous: str | None
    results: list[TextGenResponse]


class RemainingCredits(BaseModel):
    remaining_credits: float


class ErrorBody(BaseModel):
    error: str


class ModelInfo(BaseModel):
    name: str
    provider: str
    available: bool
    capabilities: list[str]
    input_price_per_million_usd: float
    output_price_per_million_usd: float
    max_output_tokens: int
    default_output_tokens: int  # the output budget of a request without config.max_output_tokens


class ModelList(BaseModel):
    results: list[ModelInfo]
