"""What the local model may answer: free text, JSON for a schema, or function calls, enforced by a grammar.

Function calling on a model whose chat template has no tool role works through the prompt and the grammar:
the declarations and the exact call format are described in a system-prompt section, and a GBNF grammar
makes the sampler produce only what the request allows:

- ``ANY``: the whole answer is ``{"name": <allowed function>, "args": <valid arguments>}``;
- ``AUTO`` / ``VALIDATED``: ``CALL_PREFIX`` followed by such a call, or an answer that does not start with
  ``<`` or whitespace (free text, or JSON when a response schema is set). The first character decides the
  branch in a single decoding pass, so a call is always schema-valid and text streams as it comes;
- ``NONE``: no declarations in the prompt and no call branch in the grammar.

Calls never appear in the text: the stream holds output back until the branch is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from textgen.errors import BadRequest, UpstreamError
from textgen.protocol import FunctionCallingMode, FunctionDeclaration, GenerationInput, Role
from textgen.providers.base import FunctionCall
from textgen.structured import CompiledSchema, Grammar, SchemaProblem, compile_schema, gbnf_literal

CALL_PREFIX = "<tool_call>"
# Free text that cannot be mistaken for a call: its first character is neither "<" nor whitespace.
_TEXT_RULE = r"[^<\x00\x09\x0A\x0D\x20] [^\x00]*"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class OutputPlan:
    """The grammar a generation runs under and how its raw text becomes text or function calls."""

    grammar: str | None = None
    calls: str = "never"  # never | always | maybe
    json_schema: CompiledSchema | None = None
    json_mode: bool = False
    functions: dict[str, CompiledSchema] = field(default_factory=dict)

    def is_call(self, text: str) -> bool | None:
        """Whether the raw output so far is a call; None while the first character is unknown."""
        if self.calls == "never":
            return False
        if self.calls == "always":
            return True
        return text.startswith("<") if text else None

    def interpret(self, raw: str, finish: str, max_tokens: int) -> tuple[str, list[FunctionCall]]:
        """Turn the finished raw output into (text, calls), refusing anything the grammar did not complete."""
        if self.is_call(raw):
            body = raw[len(CALL_PREFIX) :] if self.calls == "maybe" else raw
            call = self._parse(body, finish, max_tokens, "function call")
            if (
                not isinstance(call, dict)
                or set(call) != {"name", "args"}
                or call["name"] not in self.functions
            ):
                raise UpstreamError(f"the local model produced a malformed function call: {raw[:200]}")
            problem = self.functions[call["name"]].validate(call["args"])
            if problem is not None:
                raise UpstreamError(
                    f"the local model's call to {call['name']} has invalid arguments: {problem}"
                )
            return "", [FunctionCall(name=call["name"], args=call["args"])]
        if self.json_mode:
            value = self._parse(raw, finish, max_tokens, "JSON output")
            if self.json_schema is not None:
                problem = self.json_schema.validate(value)
                if problem is not None:
                    raise UpstreamError(
                        f"the local model's JSON does not match config.response_json_schema: {problem}"
                    )
        return raw, []

    @staticmethod
    def _parse(raw: str, finish: str, max_tokens: int, what: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            if finish == "MAX_TOKENS":
                raise UpstreamError(
                    f"the {what} was cut off at max_output_tokens ({max_tokens}) before it was complete; "
                    "raise config.max_output_tokens"
                ) from None
            raise UpstreamError(f"the local model's {what} is not valid JSON: {raw[:200]}") from None


def _bad(where: str, problem: str) -> BadRequest:
    return BadRequest(f"{where}: {problem}")


def plan_output(request: GenerationInput) -> OutputPlan:
    """Build (and so validate) the grammar for a request; BadRequest names an unusable schema."""
    cfg = request.config
    json_mode = cfg.response_mime_type == "application/json"
    compiled: CompiledSchema | None = None
    grammar = Grammar()
    answer: str | None = None
    if json_mode:
        if cfg.response_json_schema is not None:
            try:
                compiled = compile_schema(cfg.response_json_schema)
                answer = grammar.schema(compiled, "answer")
            except SchemaProblem as exc:
                raise _bad("config.response_json_schema", str(exc)) from None
        else:
            answer = f"{grammar.primitive('object')} | {grammar.primitive('array')}"
    mode = request.calling_mode
    declarations = callable_functions(request)
    if not declarations:
        if answer is None:
            return OutputPlan()
        return OutputPlan(grammar=grammar.text(answer), json_schema=compiled, json_mode=True)
    functions: dict[str, CompiledSchema] = {}
    alternatives = []
    index = {d.name: i for i, d in enumerate(request.function_declarations)}
    for declaration in declarations:
        where = f"tools.function_declarations[{index[declaration.name]}].parameters"
        schema = declaration.parameters if declaration.parameters is not None else {"type": "object"}
        try:
            params = compile_schema(schema)
            kind = params.schema.get("type", "object") if isinstance(params.schema, dict) else "object"
            if kind != "object":
                raise SchemaProblem("the parameters of a function must be an object schema")
            args = grammar.schema(params, f"args-{declaration.name}")
        except SchemaProblem as exc:
            raise _bad(where, str(exc)) from None
        functions[declaration.name] = params
        name = grammar.rule("call-name", gbnf_literal(f'{{"name":{_compact(declaration.name)},"args":'))
        alternatives.append(f'{name} {args} "}}"')
    call = grammar.rule("call", " | ".join(f"( {a} )" for a in alternatives))
    if mode is FunctionCallingMode.ANY:
        return OutputPlan(grammar=grammar.text(call), calls="always", functions=functions)
    text = answer if answer is not None else grammar.rule("text", _TEXT_RULE)
    root = f"( {gbnf_literal(CALL_PREFIX)} {call} ) | ( {text} )"
    return OutputPlan(
        grammar=grammar.text(root),
        calls="maybe",
        json_schema=compiled,
        json_mode=json_mode,
        functions=functions,
    )


def callable_functions(request: GenerationInput) -> list[FunctionDeclaration]:
    """The declarations the model may call under the request's mode (none for NONE)."""
    if request.calling_mode is FunctionCallingMode.NONE:
        return []
    allowed = set(request.allowed_function_names)
    return [d for d in request.function_declarations if d.name in allowed]


def tools_section(request: GenerationInput) -> str:
    """The system-prompt section that describes the callable functions and the exact call format."""
    declarations = callable_functions(request)
    if not declarations:
        return ""
    listed = "\n".join(
        f"- {d.name}: {d.description} Arguments: {_compact(d.parameters or {'type': 'object'})}"
        for d in declarations
    )
    if request.calling_mode is FunctionCallingMode.ANY:
        rule = 'Answer with one tool call, exactly {"name": "<tool name>", "args": {...}}.'
    else:
        rule = (
            "When the user asks for something a tool provides, do not guess: call the tool by answering "
            "exactly "
            f'{CALL_PREFIX}{{"name": "<tool name>", "args": {{...}}}}'
        )
    return (
        f"You have tools. {rule}\nTools:\n{listed}\n"
        "Keep argument values short. When a tool result is given to you, answer the user's question with it "
        "in one plain sentence."
    )


def json_section(request: GenerationInput) -> str:
    """Tells the model the shape the grammar will hold it to, so its content fits the fields."""
    cfg = request.config
    if cfg.response_mime_type != "application/json":
        return ""
    if cfg.response_json_schema is None:
        return "Reply with JSON only."
    return f"Reply with JSON only, matching this JSON Schema; keep strings short:\n{_compact(cfg.response_json_schema)}"


def render_messages(request: GenerationInput) -> list[dict[str, str]]:
    """The API's messages as chat-template messages (system/user/assistant), calls in the call format."""
    system = "\n\n".join(
        s for s in (request.system_instruction, json_section(request), tools_section(request)) if s
    )
    out: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for message in request.messages:
        role = "assistant" if message.role is Role.model else "user"
        pieces = []
        text = message.text()
        if text:
            pieces.append(text)
        if message.function_call is not None:
            call = {"name": message.function_call.name, "args": message.function_call.args}
            pieces.append(CALL_PREFIX + _compact(call))
        if message.function_response is not None:
            # Plain words work better than markup for a small model: it answers instead of calling again.
            result = message.function_response
            pieces.append(
                f"The tool {result.name} returned: {_compact(result.response)}. Use it to answer my question."
            )
        out.append({"role": role, "content": "\n".join(pieces)})
    return out
