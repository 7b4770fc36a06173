"""What the local model may answer: free text, JSON for a schema, or function calls, enforced by a grammar.

Function calling on a model whose chat template has no tool role works through the prompt and the grammar:
the declarations and the exact call format are described in a system-prompt section, and a GBNF grammar
makes the sampler produce only what the request allows:

- ``ANY``: the whole answer is ``{"name": <allowed function>, "args": <valid arguments>}``;
- ``NONE``: no declarations in the prompt and no call in the grammar;
- ``AUTO`` / ``VALIDATED``: the request is narrowed to one of those two before generation (``ToolChoice``):
  a text answer (as ``NONE``) or a call of the one function the request is about (as ``ANY`` with that
  function alone). The model's own likelihoods choose (see ``_Engine.relevance`` in ``local``): a small
  model follows a grammar well but rarely decides by itself to start a call.

A call never appears in the text: the stream holds it back and returns it whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from textgen import limits
from textgen.errors import BadRequest, UpstreamError
from textgen.protocol import (
    FunctionCallingConfig,
    FunctionCallingMode,
    FunctionDeclaration,
    GenerationInput,
    Role,
    ToolConfig,
)
from textgen.providers.base import FunctionCall
from textgen.structured import Budget, CompiledSchema, Grammar, SchemaProblem, compile_schema

# How past calls are written in the conversation shown to the model.
CALL_PREFIX = "<tool_call>"
# AUTO / VALIDATED call a function when the request's mean pointwise mutual information with the function's
# description (nats per token, measured by the model) is above this. Chosen on 72 labelled requests
# (bench/tool_choice.py, docs/local-model.md).
CALL_THRESHOLD = 0.2
# Each scoring pass evaluates at most this many tokens of the request and as many of a description.
SCORED_TOKENS = 96


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class OutputPlan:
    """The grammar a generation runs under and how its raw text becomes text or function calls."""

    grammar: str | None = None
    calls: bool = False  # the whole output is one function call
    json_schema: CompiledSchema | None = None
    json_mode: bool = False
    functions: dict[str, CompiledSchema] = field(default_factory=dict)

    def interpret(self, raw: str, finish: str, max_tokens: int) -> tuple[str, list[FunctionCall]]:
        """Turn the finished raw output into (text, calls), refusing anything the grammar did not complete."""
        if self.calls:
            call = self._parse(raw, finish, max_tokens, "function call")
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


def plan_output(request: GenerationInput, budget: Budget | None = None) -> OutputPlan:
    """Build (and so validate) the grammar for a request; BadRequest names an unusable schema.

    CPU-bound: call it off the event loop. The request's mode must be ``ANY`` or ``NONE`` (or it has no
    tools): ``tool_choice`` narrows the others. ``budget`` is shared by every grammar of one request.
    """
    cfg = request.config
    json_mode = cfg.response_mime_type == "application/json"
    compiled: CompiledSchema | None = None
    grammar = Grammar(budget)
    answer: str | None = None
    if json_mode:
        try:
            if cfg.response_json_schema is not None:
                compiled = compile_schema(cfg.response_json_schema)
                answer = grammar.schema(compiled, "answer")
            else:
                answer = grammar.any_json()
        except SchemaProblem as exc:
            raise _bad("config.response_json_schema", str(exc)) from None
    mode = request.calling_mode
    declarations = callable_functions(request)
    if not declarations:
        if answer is None:
            return OutputPlan()
        return OutputPlan(grammar=grammar.text(answer), json_schema=compiled, json_mode=True)
    functions: dict[str, CompiledSchema] = {}
    alternatives = []
    index = {d.name: i for i, d in enumerate(request.function_declarations)}
    # Where the client wrote each declaration: tools[i].function_declarations[j].
    written = {
        d.name: f"tools[{i}].function_declarations[{j}]"
        for i, tool in enumerate(request.tools)
        for j, d in enumerate(tool.function_declarations)
    }
    for declaration in declarations:
        where = f"{written[declaration.name]}.parameters"
        schema = declaration.parameters if declaration.parameters is not None else {"type": "object"}
        try:
            params = compile_schema(schema)
            kind = params.schema.get("type", "object") if isinstance(params.schema, dict) else "object"
            if kind != "object":
                raise SchemaProblem("the parameters of a function must be an object schema")
            args = grammar.schema(params, f"args-{index[declaration.name]}")
            name = grammar.literal("call-name", f'{{"name":{_compact(declaration.name)},"args":')
        except SchemaProblem as exc:
            raise _bad(where, str(exc)) from None
        functions[declaration.name] = params
        alternatives.append(f'{name} {args} "}}"')
    if mode is not FunctionCallingMode.ANY:
        raise ValueError(f"narrow a {mode} request with tool_choice before planning its output")
    call = " | ".join(f"( {a} )" for a in alternatives)
    return OutputPlan(grammar=grammar.text(call), calls=True, functions=functions)


@dataclass(slots=True)
class ToolChoice:
    """An ``AUTO`` / ``VALIDATED`` request, narrowed to each answer it allows."""

    query: str  # the user's words the choice is about
    descriptions: dict[str, str]  # what each callable function does, in words
    text: GenerationInput  # answer in text (as NONE)
    calls: dict[str, GenerationInput]  # call this one function (as ANY with it alone allowed)


def _narrowed(
    request: GenerationInput, mode: FunctionCallingMode, only: str | None = None
) -> GenerationInput:
    config = FunctionCallingConfig(mode=mode, allowed_function_names=[only] if only else None)
    return request.model_copy(update={"tool_config": ToolConfig(function_calling_config=config)})


def open_question(request: GenerationInput) -> str | None:
    """The user's words still waiting for an answer: the last message, when it is plain user text.

    After a function response (or a model turn) there is nothing left to call a tool for.
    """
    last = request.messages[-1]
    if last.role is not Role.user or last.function_response is not None or last.function_call is not None:
        return None
    return last.text().strip() or None


def tool_choice(request: GenerationInput, budget: Budget | None = None) -> ToolChoice | GenerationInput:
    """Narrow an ``AUTO`` / ``VALIDATED`` request: the request itself when nothing is left to choose."""
    if request.calling_mode not in (FunctionCallingMode.AUTO, FunctionCallingMode.VALIDATED):
        return request
    declarations = callable_functions(request)
    text = _narrowed(request, FunctionCallingMode.NONE)
    query = open_question(request)
    if not declarations:
        return text
    if len(declarations) > limits.LOCAL_MAX_SCORED_FUNCTIONS:
        raise BadRequest(
            f"tools: under mode {request.calling_mode.value} the local model chooses among at most "
            f"{limits.LOCAL_MAX_SCORED_FUNCTIONS} functions, not {len(declarations)}; name the candidates in "
            "tool_config.function_calling_config.allowed_function_names (mode VALIDATED or ANY)"
        )
    choice = ToolChoice(
        query=query or "",
        descriptions={d.name: d.description.strip() or d.name.replace("_", " ") for d in declarations},
        text=text,
        calls={d.name: _narrowed(request, FunctionCallingMode.ANY, d.name) for d in declarations},
    )
    if query is None:
        # Still build every branch, so an unusable parameter schema is refused the same way.
        for narrowed in choice.calls.values():
            plan_output(narrowed, budget)
        return text
    return choice


def scoring_tokens(request: GenerationInput) -> int:
    """An upper bound of the prompt tokens choosing a call evaluates (billed with the generation's own)."""
    if request.calling_mode not in (FunctionCallingMode.AUTO, FunctionCallingMode.VALIDATED):
        return 0
    if open_question(request) is None:
        return 0
    candidates = min(len(callable_functions(request)), limits.LOCAL_MAX_SCORED_FUNCTIONS)
    return (candidates + 1) * 2 * SCORED_TOKENS if candidates else 0


def callable_functions(request: GenerationInput) -> list[FunctionDeclaration]:
    """The declarations the model may call under the request's mode (none for NONE)."""
    if request.calling_mode is FunctionCallingMode.NONE:
        return []
    allowed = set(request.allowed_function_names)
    return [d for d in request.function_declarations if d.name in allowed]


def tools_section(request: GenerationInput) -> str:
    """The system-prompt section of an ``ANY`` request: the callable functions and the exact call format."""
    declarations = callable_functions(request)
    if not declarations:
        return ""
    listed = "\n".join(
        f"- {d.name}: {d.description} Arguments: {_compact(d.parameters or {'type': 'object'})}"
        for d in declarations
    )
    return (
        'You have tools. Answer with one tool call, exactly {"name": "<tool name>", "args": {...}}.\n'
        f"Tools:\n{listed}\nKeep argument values short."
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
