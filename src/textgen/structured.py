"""JSON Schema to GBNF grammar: constrains a local model's output to JSON that validates against a schema.

Only the keywords Gemini supports are honoured (``$id $defs $ref $anchor type format title description enum
items prefixItems minItems maxItems minimum maximum anyOf oneOf properties additionalProperties required
propertyOrdering``); every other keyword is dropped before the grammar is built and before the output is
validated, exactly as Gemini ignores them. The grammar produces compact JSON (no insignificant whitespace):
a small model cannot wander into endless blank lines, and every token carries content.

The grammar generates a subset of what the schema accepts (for example, objects without properties that
the schema does not name), so anything the model produces validates; the output is still checked with
``jsonschema`` after generation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import SchemaError as _JsonSchemaError  # type: ignore[import-untyped]
from jsonschema.protocols import Validator  # type: ignore[import-untyped]

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
MAX_DEPTH = 48
MAX_RULES = 4000
# Longer arrays are not generated (a subset of the schema, so still valid); larger minimums are refused.
MAX_ARRAY_ITEMS = 128
MAX_DIGITS = 15

_PRIMITIVES = {
    "ws-char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" ws-char* "\""',
    "int-digits": r'"0" | [1-9] [0-9]{0,14}',
    "frac": r'"." [0-9]{1,6}',
    "integer": r'"-"? int-digits',
    "number": r'"-"? int-digits frac?',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" ( string ":" value ( "," string ":" value )* )? "}"',
    "array": r'"[" ( value ( "," value )* )? "]"',
    "date": r'[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )',
    "time": r'( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,3} )? '
    r'( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "uuid": r'[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}
_PRIMITIVE_DEPS = {
    "string": ["ws-char"],
    "integer": ["int-digits"],
    "number": ["int-digits", "frac"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value"],
    "array": ["value"],
}
_FORMATS = {"date": "date", "time": "time", "date-time": None, "uuid": "uuid"}


class SchemaProblem(ValueError):
    """A schema that cannot be used to constrain generation; the message names the problem."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """A schema reduced to its supported keywords, its grammar rules and a validator for the output."""

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


def _json_literal(value: Any) -> str:
    return gbnf_literal(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


class Grammar:
    """Collects GBNF rules; several schemas can share one grammar (function calls, text-or-call)."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._refs: dict[tuple[int, str], str] = {}
        self._counter = 0

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _PRIMITIVE_DEPS.get(name, []):
                self.primitive(dep)
        return name

    def rule(self, hint: str, body: str) -> str:
        """Add a rule (or reuse an identical one) and return its name."""
        if body in self._by_body:
            return self._by_body[body]
        name = self._fresh(hint)
        self.rules[name] = body
        self._by_body[body] = name
        return name

    def _fresh(self, hint: str) -> str:
        if len(self.rules) >= MAX_RULES:
            raise SchemaProblem("the schema is too large to constrain generation")
        self._counter += 1
        clean = "".join(c if c.isalnum() else "-" for c in hint.lower()).strip("-")[:24] or "r"
        return f"{clean}-{self._counter}"

    def text(self, root: str) -> str:
        """The whole grammar with ``root`` as its start rule."""
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    def schema(self, compiled: CompiledSchema, hint: str = "json") -> str:
        """A rule generating JSON valid against ``compiled``."""
        root = compiled.schema
        return _Visitor(self, root).visit(root, hint, 0)


class _Visitor:
    def __init__(self, grammar: Grammar, root: dict[str, Any] | bool) -> None:
        self.g = grammar
        self.root = root
        self.anchors: dict[str, Any] = {}
        if isinstance(root, dict):
            self._collect_anchors(root)

    def _collect_anchors(self, node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$anchor"), str):
                self.anchors[node["$anchor"]] = node
            for value in node.values():
                self._collect_anchors(value)
        elif isinstance(node, list):
            for value in node:
                self._collect_anchors(value)

    def visit(self, schema: Any, hint: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise SchemaProblem("the schema is nested too deeply")
        if schema is True or schema == {}:
            return self.g.primitive("value")
        if schema is False:
            raise SchemaProblem(f"{hint}: the schema 'false' accepts no value")
        assert isinstance(schema, dict)
        if "$ref" in schema:
            return self._ref(schema["$ref"], depth)
        if "enum" in schema:
            return self._enum(schema, hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                alts = [
                    self.visit(self._merge(rest, sub), f"{hint}-{i}", depth + 1)
                    for i, sub in enumerate(schema[key])
                ]
                return self.g.rule(hint, " | ".join(dict.fromkeys(alts)))
        kind = schema.get("type")
        if kind is None:
            kind = self._infer_type(schema)
            if kind is None:
                return self.g.primitive("value")
        if isinstance(kind, list):
            alts = [self.visit({**schema, "type": t}, f"{hint}-{t}", depth + 1) for t in dict.fromkeys(kind)]
            return self.g.rule(hint, " | ".join(dict.fromkeys(alts)))
        if kind == "object":
            return self._object(schema, hint, depth)
        if kind == "array":
            return self._array(schema, hint, depth)
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema, hint, kind == "integer")
        return self.g.primitive(kind)

    @staticmethod
    def _merge(rest: dict[str, Any], sub: Any) -> Any:
        # Keywords beside anyOf/oneOf (a shared "type", "description") apply to every branch.
        if not isinstance(sub, dict):
            return sub
        rest = {k: v for k, v in rest.items() if k not in ("title", "description", "$id", "$anchor", "$defs")}
        return {**rest, **sub}

    @staticmethod
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

    def _ref(self, ref: Any, depth: int) -> str:
        if not isinstance(ref, str):
            raise SchemaProblem("$ref must be a string")
        key = (id(self.root), ref)
        if key in self.g._refs:
            return self.g._refs[key]
        target = self._resolve(ref)
        # Name the rule before visiting so recursive schemas refer to themselves.
        name = self.g._fresh("ref-" + ref.rsplit("/", 1)[-1])
        self.g._refs[key] = name
        self.g.rules[name] = "null"  # placeholder, replaced below
        self.g.rules[name] = self.visit(target, name + "-body", depth + 1)
        return name

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaProblem(f"$ref {ref!r}: only references inside the schema (starting with '#') work")
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            anchor = ref[1:]
            if anchor not in self.anchors:
                raise SchemaProblem(f"$ref {ref!r}: no $anchor {anchor!r} in the schema")
            return self.anchors[anchor]
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

    def _enum(self, schema: dict[str, Any], hint: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaProblem(f"{hint}: enum must be a non-empty array")
        kept = ("type", "minimum", "maximum", "minItems", "maxItems")
        rest = {k: v for k, v in schema.items() if k in kept}
        checker = Draft202012Validator(rest)
        allowed = [v for v in values if checker.is_valid(v)]
        if not allowed:
            raise SchemaProblem(f"{hint}: no enum value matches the schema's other constraints")
        return self.g.rule(hint, " | ".join(dict.fromkeys(_json_literal(v) for v in allowed)))

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt in _FORMATS:
            if fmt == "date-time":
                body = r'"\"" date "T" time "\""'
                self.g.primitive("date")
                self.g.primitive("time")
            else:
                body = rf'"\"" {self.g.primitive(str(_FORMATS[fmt]))} "\""'
            return self.g.rule(f"str-{fmt}", body)
        return self.g.primitive("string")

    def _number(self, schema: dict[str, Any], hint: str, integer: bool) -> str:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        for name, bound in (("minimum", lo), ("maximum", hi)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
                raise SchemaProblem(f"{hint}: {name} must be a number")
        if lo is None and hi is None:
            return self.g.primitive("integer" if integer else "number")
        if lo is not None and hi is not None and lo > hi:
            raise SchemaProblem(f"{hint}: minimum {lo} is greater than maximum {hi}")
        lo_i = None if lo is None else math.ceil(lo)
        hi_i = None if hi is None else math.floor(hi)
        alts: list[str] = []
        if lo_i is None or hi_i is None or lo_i <= hi_i:
            alts.append(_signed_range(lo_i, hi_i))
        if not integer:
            frac = self.g.primitive("frac")
            # k.f lies in [k, k+1): non-negative k needs k + 1 <= maximum.
            pos_lo = max(lo_i, 0) if lo_i is not None else 0
            pos_hi = None if hi is None else math.floor(hi) - 1
            if pos_hi is None or pos_lo <= pos_hi:
                alts.append(f"({_range(pos_lo, pos_hi)}) {frac}")
            # -k.f lies in (-(k+1), -k]: needs -(k+1) >= minimum and -k <= maximum.
            neg_lo = 0 if hi is None or hi >= 0 else math.ceil(-hi)
            neg_hi = None if lo is None else math.floor(-lo) - 1
            if (lo is None or lo < 0) and (neg_hi is None or neg_lo <= neg_hi):
                alts.append(f'"-" ({_range(neg_lo, neg_hi)}) {frac}')
        if not alts:
            if integer:
                raise SchemaProblem(f"{hint}: no integer lies between minimum {lo} and maximum {hi}")
            alts.append(_json_literal(lo))
        return self.g.rule(hint, " | ".join(f"( {a} )" for a in alts))

    def _array(self, schema: dict[str, Any], hint: str, depth: int) -> str:
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)):
            raise SchemaProblem(f"{hint}: minItems and maxItems must be integers")
        if hi is not None and lo > hi:
            raise SchemaProblem(f"{hint}: minItems {lo} is greater than maxItems {hi}")
        if lo > MAX_ARRAY_ITEMS:
            raise SchemaProblem(
                f"{hint}: minItems {lo} is more than the {MAX_ARRAY_ITEMS} items the local model can generate"
            )
        hi = MAX_ARRAY_ITEMS if hi is None else min(hi, MAX_ARRAY_ITEMS)
        prefix = schema.get("prefixItems", [])
        items = schema.get("items")
        pieces = [self.visit(sub, f"{hint}-item{i}", depth + 1) for i, sub in enumerate(prefix[:hi])]
        rest_lo = max(0, lo - len(pieces))
        rest_hi = hi - len(pieces)
        if items is False or (items is None and prefix):
            # No more items are needed beyond the prefix when the schema does not describe them.
            if rest_lo > 0 and items is False:
                raise SchemaProblem(f"{hint}: minItems {lo} needs more items than prefixItems allows")
            rest_hi = rest_lo
            item = self.g.primitive("value")
        else:
            item = self.visit(True if items is None else items, f"{hint}-item", depth + 1)
        body = ' "," '.join(pieces)
        if not pieces:
            if rest_hi <= 0:
                return self.g.rule(hint, '"[]"')
            first = item
            if rest_lo == 0:
                tail = f'( "," {item} ){{0,{rest_hi - 1}}}' if rest_hi > 1 else ""
                return self.g.rule(hint, f'"[" ( {first} {tail} )? "]"')
            tail = f'( "," {item} ){{{rest_lo - 1},{rest_hi - 1}}}' if rest_hi > 1 else ""
            return self.g.rule(hint, f'"[" {first} {tail} "]"')
        if rest_hi > 0:
            body += f' ( "," {item} ){{{rest_lo},{rest_hi}}}'
        return self.g.rule(hint, f'"[" {body} "]"')

    def _object(self, schema: dict[str, Any], hint: str, depth: int) -> str:
        props: dict[str, Any] = dict(schema.get("properties") or {})
        required = schema.get("required") or []
        additional = schema.get("additionalProperties")
        order = [n for n in schema.get("propertyOrdering") or [] if isinstance(n, str) and n in props]
        names = list(dict.fromkeys([*order, *props]))
        for name in required:
            if name not in props:
                if additional is False:
                    raise SchemaProblem(f"{hint}: required {name!r} is forbidden by additionalProperties")
                names.append(name)
                props[name] = additional if isinstance(additional, dict) else True
        if not names:
            if additional is False:
                return self.g.rule(hint, '"{}"')
            if isinstance(additional, dict) and additional:
                value = self.visit(additional, f"{hint}-value", depth + 1)
                string = self.g.primitive("string")
                return self.g.rule(hint, f'"{{" ( {string} ":" {value} ( "," {string} ":" {value} )* )? "}}"')
            return self.g.primitive("object")
        pairs = []
        for n in names:
            key = gbnf_literal(json.dumps(n, ensure_ascii=False) + ":")
            pairs.append((f"{key} {self.visit(props[n], f'{hint}-{n}', depth + 1)}", n in required))
        return self.g.rule(hint, f'"{{" {self._members(pairs, hint)} "}}"')

    def _members(self, pairs: list[tuple[str, bool]], hint: str) -> str:
        """Properties in order: required ones always, optional ones maybe, commas only between members."""
        first_required = next((i for i, (_, req) in enumerate(pairs) if req), None)
        if first_required is not None:
            parts = [f'( {kv} "," )?' for kv, _ in pairs[:first_required]]
            parts.append(pairs[first_required][0])
            for kv, req in pairs[first_required + 1 :]:
                parts.append(f'"," {kv}' if req else f'( "," {kv} )?')
            return " ".join(parts)
        # All optional: the first member present starts without a comma, the following ones carry one.
        tails: list[str] = []
        tail = ""
        for kv, _ in reversed(pairs):
            tails.append(tail)
            tail = self.g.rule(f"{hint}-tail", f'( "," {kv} )? {tail}'.strip())
        tails.reverse()
        alts = [f"{kv} {rest}".strip() for (kv, _), rest in zip(pairs, tails, strict=True)]
        return f"( {' | '.join(f'( {a} )' for a in alts)} )?"


def _range(lo: int, hi: int | None) -> str:
    """GBNF for the decimal numerals of the non-negative integers lo..hi (hi None: unbounded)."""
    if hi is None:
        width = len(str(lo))
        longer = f"[1-9] [0-9]{{{width},{MAX_DIGITS - 1}}}" if width < MAX_DIGITS else ""
        if lo == 0:
            return f'"0" | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}}'
        bounded = _range(lo, 10**width - 1)
        return f"{bounded} | {longer}" if longer else bounded
    alts: list[str] = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(hi, 10**width - 1)
        if a <= b:
            alts.extend(_same_width(str(a), str(b)))
    return " | ".join(alts)


def _same_width(a: str, b: str) -> Iterator[str]:
    if len(a) == 1:
        yield _digit(a, b)
        return
    if a[0] == b[0]:
        for rest in _same_width(a[1:], b[1:]):
            yield f'"{a[0]}" ( {rest} )'
        return
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        yield f"{_digit(a[0], b[0])} [0-9]{{{n}}}"
        return
    for rest in _same_width(a[1:], "9" * n):
        yield f'"{a[0]}" ( {rest} )'
    if int(a[0]) + 1 <= int(b[0]) - 1:
        yield f"{_digit(str(int(a[0]) + 1), str(int(b[0]) - 1))} [0-9]{{{n}}}"
    for rest in _same_width("0" * n, b[1:]):
        yield f'"{b[0]}" ( {rest} )'


def _digit(a: str, b: str) -> str:
    return f'"{a}"' if a == b else f"[{a}-{b}]"


def _signed_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and lo >= 0:
        return _range(lo, hi)
    if hi is not None and hi < 0:
        return f'"-" ( {_range(-hi, None if lo is None else -lo)} )'
    negative = f'"-" ( {_range(1, None if lo is None else -lo)} )'
    return f"{negative} | {_range(0, hi)}"


def json_grammar(compiled: CompiledSchema | None) -> str:
    """A complete grammar for one JSON document (any object or array when there is no schema)."""
    grammar = Grammar()
    if compiled is None:
        return grammar.text(f"{grammar.primitive('object')} | {grammar.primitive('array')}")
    return grammar.text(grammar.schema(compiled))
