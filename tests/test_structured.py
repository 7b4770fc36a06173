"""The grammar of a JSON Schema, checked by llama.cpp itself: where textgen differs from llama-cpp-python's
converter (``json_schema_to_gbnf``), and why."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp
import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from textgen.providers.local_model import bundled_model_path
from textgen.structured import compile_schema, json_grammar

Accepts = Callable[[str, str], bool]


@pytest.fixture(scope="module")
def accepts() -> Iterator[Accepts]:
    """Whether a grammar lets llama.cpp's sampler produce exactly a text (token by token, then the end)."""
    llm = llama_cpp.Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)
    end = llm.token_eos()

    def check(grammar: str, text: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
        assert sampler, "llama.cpp rejected the grammar"
        try:
            for token in [*llm.tokenize(text.encode(), add_bos=False, special=False), end]:
                data = (llama_cpp.llama_token_data * 1)(
                    llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
                )
                candidates = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
                if math.isinf(data[0].logit):
                    return False
                if token != end:
                    llama_cpp.llama_sampler_accept(sampler, token)
            return True
        finally:
            llama_cpp.llama_sampler_free(sampler)

    yield check
    llm.close()


def ours(schema: Any) -> str:
    return json_grammar(compile_schema(schema))


def library(schema: Any) -> str:
    return str(json_schema_to_gbnf(json.dumps(schema)))


def test_number_ranges_are_kept_because_the_library_ignores_them(accepts: Accepts) -> None:
    age = {"type": "integer", "minimum": 18, "maximum": 99}
    assert library(age) == library({"type": "integer"})
    assert accepts(library(age), "5") and accepts(library(age), "100")
    assert [accepts(ours(age), n) for n in ("17", "18", "42", "99", "100", "-20")] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    amount = {"type": "number", "minimum": 0, "maximum": 2.5}
    assert accepts(library(amount), "-3")
    assert [accepts(ours(amount), n) for n in ("0", "1.75", "2", "-3", "3", "-0.5")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_strings_refuse_raw_control_characters_which_json_forbids(accepts: Accepts) -> None:
    raw_newline = '"two\nlines"'
    with pytest.raises(ValueError):
        json.loads(raw_newline)
    assert accepts(library({"type": "string"}), raw_newline)
    assert not accepts(ours({"type": "string"}), raw_newline)
    assert accepts(ours({"type": "string"}), json.dumps("two\nlines"))


def test_literals_escape_backslashes(accepts: Accepts) -> None:
    schema = {"enum": ["C:\\dir"], "type": "string"}
    assert not accepts(library(schema), json.dumps("C:\\dir"))
    assert accepts(ours(schema), json.dumps("C:\\dir"))


def test_references_with_the_same_last_segment_stay_apart(accepts: Accepts) -> None:
    schema = {
        "$defs": {
            "x": {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]},
            "o": {
                "type": "object",
                "properties": {
                    "x": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
                },
            },
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/o/properties/x"}, "b": {"$ref": "#/$defs/x"}},
        "required": ["a", "b"],
    }
    valid = '{"a": {"n": 1}, "b": {"s": "t"}}'
    assert compile_schema(schema).validate(json.loads(valid)) is None
    assert not accepts(library(schema), valid)
    assert accepts(ours(schema), valid)


def test_schemas_the_library_cannot_read_are_rewritten_first(accepts: Accepts) -> None:
    # A true schema, keywords beside anyOf, and a type list (Gemini's nullable) with its other keywords.
    for schema in (
        {"type": "object", "properties": {"a": True}, "required": ["a"]},
        {"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"required": ["a"]}]},
    ):
        with pytest.raises((AttributeError, AssertionError)):
            library(schema)
        assert accepts(ours(schema), '{"a": "x"}')
    nullable = {
        "type": "OBJECT",
        "nullable": True,
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    }
    clean = compile_schema(nullable).schema
    assert accepts(library(clean), '{"m": 1}')
    assert [accepts(ours(nullable), text) for text in ('{"n": 1}', "null", '{"m": 1}')] == [True, True, False]


def test_property_ordering_sets_the_order_of_the_properties(accepts: Accepts) -> None:
    schema = {
        "type": "object",
        "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
        "required": ["a", "b"],
        "propertyOrdering": ["a", "b"],
    }
    assert accepts(ours(schema), '{"a": 1, "b": 2}')
    assert not accepts(ours(schema), '{"b": 2, "a": 1}')


def test_nested_any_of_levels_each_add_the_same_amount_of_grammar() -> None:
    # Keywords beside anyOf apply to each branch; merged naively, each level would double the work.
    def nested(levels: int) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        for _ in range(levels):
            schema = {
                "type": "object",
                "properties": {"v": schema, "w": {"type": "integer"}},
                "anyOf": [{"required": ["v"]}, {"required": ["w"]}],
            }
        return json.loads(json.dumps(schema))  # a tree, as any request body is

    rules = [ours(nested(levels)).count("\n") for levels in (16, 17, 18)]
    assert rules[2] - rules[1] == rules[1] - rules[0] <= 10
    assert len(ours(nested(18))) < 32 * 1024
