"""JSON Schema to GBNF grammar: constrains a local model's output to JSON that validates against a schema.

Only the keywords Gemini supports are honoured (``$id $defs $ref $anchor type format title description enum
items prefixItems minItems maxItems minimum maximum anyOf oneOf properties additionalProperties required
propertyOrdering``); every other keyword is dropped before the grammar is built and before the output is
validated, exactly as Gemini ignores them.

The grammar is built by llama-cpp-python's converter (``llama_cpp.llama_grammar.SchemaConverter``, the one its
server uses). ``_Normaliser`` first rewrites the schema into the forms that converter reads (``true`` schemas,
type lists and keywords beside ``anyOf`` spelled out, ``propertyOrdering`` applied, references checked), and
refuses unusable schemas with a message naming the problem. ``_Converter`` differs from the library only
where it falls short (tests/test_structured.py shows each):

- integer and number ranges: the library ignores ``minimum`` and ``maximum``;
- string characters: the library admits raw control characters, which JSON forbids inside strings;
- literals: the library does not escape backslashes;
- ``$ref``: the library names a reference's rule by its last segment, so ``#/$defs/a/properties/x`` and
  ``#/$defs/x``, or two functions' ``#/$defs/x``, share one rule;
- bounded work: a schema object reached twice is converted once, rule names are numbered in constant time,
  and building stops past a time and size budget (``textgen.limits``).

The grammar generates a subset of what the schema accepts, so anything the model produces validates; the
output is still checked with ``jsonschema`` after generation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import SchemaError as _JsonSchemaError  # type: ignore[import-untyped]
from jsonschema.protocols import Validator  # type: ignore[import-untyped]
from llama_cpp.llama_grammar import (  # type: ignore[import-untyped]
    INVALID_RULE_CHARS_RE,
    PRIMITIVE_RULES,
    BuiltinRule,
    SchemaConverter,
)

from textgen import limits
from textgen.grammar_ranges import number_alternatives

SUPPORTED_KEYWORDS = frozenset(
    {
        "$id",
        "$defs",
        "$ref",
        "$anchor",
        "type",
        "format",
        "title",
        "description",
        "enum",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "anyOf",
        "oneOf",
        "properties",
        "additionalProperties",
        "required",
        "propertyOrdering",
    }
)
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# Any JSON value, in the form the library reads (it turns ``{}`` into "any object").
ANY: dict[str, Any] = {
    "anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean", "null")]
}
_OBJECT_OR_ARRAY: dict[str, Any] = {"anyOf": [{"type": "object"}, {"type": "array"}]}
# Keywords beside anyOf / oneOf that apply to every branch are merged into it; these describe the whole.
_NOT_MERGED = frozenset({"anyOf", "oneOf", "title", "description", "$id", "$anchor", "$defs"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
_JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])


class SchemaProblem(ValueError):
    """A schema that cannot be used to constrain generation; the message names the problem."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """A schema reduced to its supported keywords and a validator for the output."""

    schema: dict[str, Any] | bool
    validator: Validator

    def validate(self, value: Any) -> str | None:
        """The first validation error's message, or None when the value is valid."""
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{error.message} (at /{where})" if where else error.message


def sanitize(schema: Any, path: str = "") -> Any:
    """Keep only the supported keywords, normalise OpenAPI-style types (``STRING``, ``nullable``)."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise SchemaProblem(f"{path or 'the schema'} must be an object or a boolean")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            continue
        if key == "type":
            value = _normalise_type(value, path)
            if schema.get("nullable") is True:
                types = value if isinstance(value, list) else [value]
                value = [*types, "null"] if "null" not in types else types
        elif key in ("$defs", "properties"):
            if not isinstance(value, dict):
                raise SchemaProblem(f"{path}/{key} must be an object")
            value = {name: sanitize(sub, f"{path}/{key}/{name}") for name, sub in value.items()}
        elif key in ("anyOf", "oneOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise SchemaProblem(f"{path}/{key} must be a non-empty array of schemas")
            value = [sanitize(sub, f"{path}/{key}/{i}") for i, sub in enumerate(value)]
        elif key in ("items", "additionalProperties"):
            value = sanitize(value, f"{path}/{key}")
        out[key] = value
    return out


def _normalise_type(value: Any, path: str) -> Any:
    names = value if isinstance(value, list) else [value]
    normalised = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in JSON_TYPES:
            raise SchemaProblem(f"{path}/type: {name!r} is not a JSON type")
        normalised.append(name.lower())
    if not normalised:
        raise SchemaProblem(f"{path}/type must not be empty")
    return normalised if isinstance(value, list) else normalised[0]


def compile_schema(schema: Any) -> CompiledSchema:
    """Sanitise a schema and check that it is a valid JSON Schema (draft 2020-12)."""
    clean = sanitize(schema)
    try:
        Draft202012Validator.check_schema(clean)
    except _JsonSchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaProblem(f"{exc.message}" + (f" (at /{where})" if where else "")) from None
    return CompiledSchema(clean, Draft202012Validator(clean))


def gbnf_literal(text: str) -> str:
    """A GBNF string literal."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class Budget:
    """The time and grammar size one request's grammars may take; past either, a SchemaProblem."""

    def __init__(self, seconds: float | None = None, size: int | None = None) -> None:
        # The limits are read when a budget is made, not when this module is imported.
        self.seconds = limits.GRAMMAR_BUILD_SECONDS if seconds is None else seconds
        self.size = limits.MAX_GRAMMAR_BYTES if size is None else size
        self.deadline = time.monotonic() + self.seconds
        self.used = 0

    def tick(self) -> None:
        if time.monotonic() >= self.deadline:
            raise SchemaProblem(f"building its grammar took longer than the limit of {self.seconds:g} s")

    def spend(self, size: int) -> None:
        self.used += size
        if self.used > self.size:
            raise SchemaProblem(f"its grammar is larger than the limit of {self.size} bytes")


class _Normaliser:
    """Rewrites one sanitised schema into the forms the library reads, checking it on the way.

    Each schema object is rewritten once (``done``), whatever the number of paths that reach it, and a
    ``$ref`` becomes a key into ``targets``, so the work is linear in the schema.
    """

    def __init__(self, root: dict[str, Any] | bool, key: str) -> None:
        self.root = root
        self.key = key  # keeps this schema's references apart from another's in the same grammar
        self.done: dict[int, dict[str, Any]] = {}
        self.targets: dict[str, dict[str, Any]] = {}
        self._pending: list[tuple[str, Any, str]] = []
        self._anchors: dict[str, Any] | None = None

    def run(self) -> dict[str, Any]:
        out = self.node(self.root, "")
        while self._pending:
            key, target, where = self._pending.pop()
            self.targets[key] = self.node(target, where)
        return out

    def node(self, schema: Any, where: str) -> dict[str, Any]:
        if schema is True:
            return ANY
        if schema is False:
            raise SchemaProblem(f"{_at(where)}the schema 'false' accepts no value")
        done = self.done.get(id(schema))
        if done is None:
            done = self.done[id(schema)] = self._shape(schema, where)
        return done

    def _shape(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise SchemaProblem(f"{_at(where)}enum must be a non-empty array")
            return {"enum": schema["enum"]}
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                rest = {k: v for k, v in schema.items() if k not in _NOT_MERGED}
                branches = [
                    self._shape({**rest, **(sub if isinstance(sub, dict) else {})}, f"{where}/{keyword}/{i}")
                    if rest
                    else self.node(sub, f"{where}/{keyword}/{i}")
                    for i, sub in enumerate(schema[keyword])
                    if sub is not False  # a branch nothing matches
                ]
                if not branches:
                    raise SchemaProblem(f"{_at(where)}every branch of {keyword} is the schema 'false'")
                return {"anyOf": branches}
        kind = schema.get("type") or _infer_type(schema)
        if isinstance(kind, list):
            rest = {k: v for k, v in schema.items() if k != "type"}
            return {"anyOf": [self._shape({**rest, "type": t}, where) for t in dict.fromkeys(kind)]}
        if kind == "object":
            return self._object(schema, where)
        if kind == "array":
            return self._array(schema, where)
        if kind in ("integer", "number"):
            lo, hi = schema.get("minimum"), schema.get("maximum")
            if lo is not None and hi is not None and lo > hi:
                raise SchemaProblem(f"{_at(where)}minimum {lo} is greater than maximum {hi}")
            if kind == "integer" and _no_integer_between(lo, hi):
                raise SchemaProblem(f"{_at(where)}no integer lies between minimum {lo} and maximum {hi}")
            return {"type": kind, **{k: v for k, v in schema.items() if k in ("minimum", "maximum")}}
        if kind == "string" and schema.get("format") in _FORMATS:
            return {"type": "string", "format": schema["format"]}
        return ANY if kind is None else {"type": kind}

    def _object(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required = [n for n in schema.get("required") or [] if isinstance(n, str)]
        additional = schema.get("additionalProperties")
        order = [n for n in schema.get("propertyOrdering") or [] if isinstance(n, str) and n in props]
        out: dict[str, Any] = {}
        for name in dict.fromkeys([*order, *props]):
            if props[name] is False and name not in required:
                continue  # never generated
            out[name] = self.node(props[name], f"{where}/properties/{name}")
        for name in required:
            if name not in props:
                if additional is False:
                    raise SchemaProblem(f"{_at(where)}required {name!r} is forbidden by additionalProperties")
                out[name] = (
                    ANY if additional is None else self.node(additional, f"{where}/additionalProperties")
                )
        shaped: dict[str, Any] = {"type": "object"}
        if out:
            shaped["properties"] = out
            shaped["required"] = list(dict.fromkeys(required))
        if additional is False:
            shaped["additionalProperties"] = False
        elif additional is not None:
            shaped["additionalProperties"] = self.node(additional, f"{where}/additionalProperties")
        return shaped

    def _array(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if hi is not None and lo > hi:
            raise SchemaProblem(f"{_at(where)}minItems {lo} is greater than maxItems {hi}")
        if lo > limits.MAX_ARRAY_ITEMS:
            raise SchemaProblem(
                f"{_at(where)}minItems {lo} is more than the {limits.MAX_ARRAY_ITEMS} items "
                "the local model can generate"
            )
        prefix, items = schema.get("prefixItems"), schema.get("items")
        if prefix:
            # The library generates the prefix exactly; no more items are needed.
            return {"prefixItems": [self.node(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix)]}
        if items is False:
            return {"enum": [[]]}
        shaped: dict[str, Any] = {
            "type": "array",
            "items": self.node(True if items is None else items, f"{where}/items"),
        }
        shaped["minItems"] = lo
        if hi is not None:
            # Longer arrays are not generated (a subset of the schema, so still valid).
            shaped["maxItems"] = min(hi, limits.MAX_ARRAY_ITEMS)
        return shaped

    def _ref(self, ref: Any, where: str) -> dict[str, Any]:
        if not isinstance(ref, str):
            raise SchemaProblem(f"{_at(where)}$ref must be a string")
        key = self.key + ref
        if key not in self.targets:
            self.targets[key] = ANY  # replaced once the target is rewritten (it may refer to itself)
            try:
                target = self._resolve(ref)
            except SchemaProblem as exc:
                raise SchemaProblem(f"{_at(where)}{exc}") from None
            self._pending.append((key, target, ref))
        return {"$ref": key}

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaProblem(f"$ref {ref!r}: only references inside the schema (starting with '#') work")
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            anchor = ref[1:]
            if self._anchors is None:
                self._anchors = _anchors(self.root)
            if anchor not in self._anchors:
                raise SchemaProblem(f"$ref {ref!r}: no $anchor {anchor!r} in the schema")
            return self._anchors[anchor]
        node: Any = self.root
        for raw in ref[2:].split("/"):
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise SchemaProblem(f"$ref {ref!r} does not resolve (only supported keywords are kept)")
        if not isinstance(node, dict | bool):
            raise SchemaProblem(f"$ref {ref!r} does not point to a schema")
        return node


def _at(where: str) -> str:
    """The location of a problem in the schema, as a prefix ("" at its root)."""
    return f"{where}: " if where else ""


def _no_integer_between(lo: Any, hi: Any) -> bool:
    numbers = [
        v for v in (lo, hi) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    return len(numbers) == 2 and math.ceil(numbers[0]) > math.floor(numbers[1])


def _infer_type(schema: dict[str, Any]) -> str | None:
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "minItems" in schema or "maxItems" in schema:
        return "array"
    if "minimum" in schema or "maximum" in schema:
        return "number"
    if "format" in schema:
        return "string"
    return None


def _anchors(root: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$anchor"), str):
                found.setdefault(node["$anchor"], node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class _Converter(SchemaConverter):  # type: ignore[misc]
    """The library's converter, with the differences listed in the module docstring."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        self.budget = budget
        self.targets: dict[str, dict[str, Any]] = {}
        self._visited: dict[int, str] = {}
        self._ref_rules: dict[str, str] = {}
        self._named: dict[tuple[str, str], str] = {}
        self._suffix: dict[str, int] = {}

    def visit(self, schema: dict[str, Any], name: str) -> str:
        self.budget.tick()
        rule = self._visited.get(id(schema))
        if rule is None:
            if schema.get("type") in ("integer", "number") and ("minimum" in schema or "maximum" in schema):
                rule = self._add_rule(name, _number_rule(self, schema))
            else:
                rule = super().visit(schema, name)  # type: ignore[no-untyped-call]
            self._visited[id(schema)] = rule
        return str(rule)

    def _add_rule(self, name: str, rule: str) -> str:
        self.budget.tick()
        base = INVALID_RULE_CHARS_RE.sub("-", name)
        key = self._named.get((base, rule))
        if key is not None:
            return key
        key = base
        if key in self._rules:
            n = self._suffix.get(base, 0)
            while f"{base}{n}" in self._rules:
                n += 1
            self._suffix[base] = n + 1
            key = f"{base}{n}"
        self.budget.spend(len(key) + len(rule) + 5)
        self._rules[key] = rule
        self._named[(base, rule)] = key
        return key

    def _resolve_ref(self, ref: str) -> str:
        name = self._ref_rules.get(ref)
        if name is None:
            # Hint-prefixed rule names never start with "ref-"; named before visiting, for recursion.
            name = self._ref_rules[ref] = f"ref-{len(self._ref_rules)}"
            self._rules[name] = '""'
            body = str(self.visit(self.targets[ref], f"{name}-body"))
            self.budget.spend(len(name) + len(body) + 5)
            self._rules[name] = body
        return name

    def _format_literal(self, literal: str) -> str:
        return gbnf_literal(literal)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return str(super()._add_primitive(name, _JSON_CHAR if name == "char" else rule))


class Grammar:
    """Collects GBNF rules; several schemas can share one grammar (function calls)."""

    def __init__(self, budget: Budget | None = None) -> None:
        self._converter = _Converter(budget or Budget())

    def schema(self, compiled: CompiledSchema, hint: str = "json") -> str:
        """A rule generating JSON valid against ``compiled``."""
        normaliser = _Normaliser(compiled.schema, hint)
        shaped = normaliser.run()
        self._converter.targets.update(normaliser.targets)
        try:
            return self._converter.visit(shaped, hint)
        except RecursionError:
            raise SchemaProblem("the schema is nested too deeply to build its grammar") from None

    def any_json(self) -> str:
        """A rule generating any JSON object or array."""
        return self._converter.visit(_OBJECT_OR_ARRAY, "json")

    def literal(self, hint: str, text: str) -> str:
        """A rule generating exactly ``text``."""
        return str(self._converter._add_rule(hint, gbnf_literal(text)))

    def text(self, root: str) -> str:
        """The whole grammar with ``root`` as its start rule."""
        rules = self._converter._rules
        return "\n".join([f"root ::= {root}", *(f"{name} ::= {body}" for name, body in rules.items())]) + "\n"


def _number_rule(converter: _Converter, schema: dict[str, Any]) -> str:
    """GBNF for the numbers between ``minimum`` and ``maximum`` (the library ignores both)."""
    integer = schema["type"] == "integer"
    lo, hi = schema.get("minimum"), schema.get("maximum")
    frac = (
        None
        if integer
        else '"." ' + converter._add_primitive("decimal-part", PRIMITIVE_RULES["decimal-part"])
    )
    alts = number_alternatives(lo, hi, frac)
    if not alts:
        if integer:
            raise SchemaProblem(f"no integer lies between minimum {lo} and maximum {hi}")
        alts.append(gbnf_literal(json.dumps(lo)))
    return "( " + " | ".join(f"( {a} )" for a in alts) + " ) space"


def json_grammar(compiled: CompiledSchema | None) -> str:
    """A complete grammar for one JSON document (any object or array when there is no schema)."""
    grammar = Grammar()
    return grammar.text(grammar.schema(compiled) if compiled is not None else grammar.any_json())
