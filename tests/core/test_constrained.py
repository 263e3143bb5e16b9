"""Constrained decoding: output held to a JSON schema always parses and validates (schemas drawn by Hypothesis
within the supported subset), unsupported schema features are refused by name, and constrained rows batch with
free ones without changing them."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_tiny_tokenizer, tiny_model
from unsloth_core.constrained import Constraint, GrammarError, check
from unsloth_core.generate import Generator
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine
from unsloth_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model() -> Llama:
    return tiny_model(seed=3, std=0.3)


NAMES = st.sampled_from(["a", "name", "id", "tags", "ok", "x y", "ünï"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.text(max_size=4))


@st.composite
def integer_schema(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": low, "maximum": draw(st.integers(low, low + 2000))}


LEAVES = st.one_of(
    integer_schema(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(SCALARS, min_size=1, max_size=4, unique_by=json.dumps).map(lambda xs: {"enum": xs}),
)


def _object(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=3))
        required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    return build()


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)),
    ),
    max_leaves=6,
).filter(lambda s: s.get("type") in ("object", "array"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**32))
def test_constrained_output_parses_and_validates(model: Llama, tok: Tokenizer, schema: dict[str, Any],
                                                 seed: int) -> None:
    gen = Generator(model, tok)
    params = SamplingParams(max_new_tokens=500, temperature=1.0, seed=seed, constraint=Constraint.json_schema(schema))
    out = gen.generate(["x"], params)[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)


def test_constrained_and_free_rows_share_a_batch(model: Llama, tok: Tokenizer) -> None:
    """The free rows decode exactly as they do alone; the constrained ones give schema-valid JSON, and the grammar's
    end ends its row even where the row ignores EOS."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    free = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])
    ab, cd, x, y = (tok.encode(t) for t in ("ab", "cd", "x", "y"))
    alone = Generator(tiny_model(seed=3, std=0.3), tok).generate([ab, cd], free)
    engine = BatchEngine(model, tok, max_batch_size=8, max_seq_length=128)
    held = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[],
                          constraint=Constraint.json_schema(schema))
    streams = [engine.submit(ab, free, 0), engine.submit(x, held, 1),
               engine.submit(cd, free, 2), engine.submit(y, SamplingParams(
                   temperature=0.8, seed=1, max_new_tokens=60, constraint=Constraint.json_object()), 3)]
    results = [list(s) for s in streams]
    engine.close()
    texts = ["".join(d.text for d in r) for r in results]
    assert [t for i, t in enumerate(texts) if i in (0, 2)] == [c.text for c in alone]
    assert json.loads(texts[1]).keys() == {"n"} and results[1][-1].finish_reason == "stop"
    assert isinstance(json.loads(texts[3]), dict)


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ({"type": "strung"}, "strung"),
])
def test_unsupported_schemas_are_refused_by_name(tok: Tokenizer, schema: dict[str, Any], named: str) -> None:
    with pytest.raises(GrammarError, match=named):
        check(Constraint.json_schema(schema), tok)


def test_a_lark_grammar_holds_the_output(model: Llama, tok: Tokenizer) -> None:
    grammar = 'start: "answer: " ("yes" | "no")'
    out = Generator(model, tok).generate(["q"], SamplingParams(max_new_tokens=20, temperature=1.0, seed=4,
                                                               constraint=Constraint("lark", grammar)))[0]
    assert out.text in ("answer: yes", "answer: no") and out.finish_reason == "stop"


def test_the_grammar_view_of_a_tokenizer_is_built_per_end_of_sequence_set() -> None:
    """A view built for one eos set (the first caller's) served every later row before, so a row stopping on other
    tokens was held to ends it does not stop on: e.g. a check with the tokenizer's own eos, then a row whose stop
    ids are the engine's wider set."""
    from unsloth_core.constrained import grammar_tokenizer

    tok = make_tiny_tokenizer()
    own = grammar_tokenizer(tok, [])
    assert own.eos_tokens == list(tok.eos_token_ids) and grammar_tokenizer(tok, tok.eos_token_ids) is own
    wider = grammar_tokenizer(tok, [*tok.eos_token_ids, 5])
    assert wider.eos_tokens == [*tok.eos_token_ids, 5] and wider is not own
    assert grammar_tokenizer(tok, [*tok.eos_token_ids, 5]) is wider
