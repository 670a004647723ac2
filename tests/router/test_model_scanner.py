"""Body routing reads ``model`` without decoding long strings: it must agree with json.loads.

The reference is plain json.loads. Random documents (valid, then corrupted) go through both
with the size thresholds made tiny, so that every string is "long", every long string is
checked in several pieces and cuts land next to escapes and inside UTF-8 sequences.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import llmhop

SEED = 20261125
DOCUMENTS = 3000


def reference(payload: bytes) -> tuple[str, ...]:
    """What routing must conclude: the model, or the error code, as with json.loads."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return ("error", "invalid_json")
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str) or not model:
        return ("error", "missing_model")
    return ("model", model)


def routed(payload: bytes) -> tuple[str, ...]:
    try:
        return ("model", llmhop.model_of_body(payload))
    except llmhop.HTTPError as exc:
        return ("error", exc.code)


@pytest.fixture(params=[7, 16], ids=["pieces of 7", "pieces of 16"])
def tiny_thresholds(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setattr(llmhop, "LONG_BODY", 0)
    monkeypatch.setattr(llmhop, "LONG_STRING", len("model"))
    monkeypatch.setattr(llmhop, "STRING_PIECE", request.param)


# Pieces of string contents as they appear in the JSON text, escapes and all.
TEXT_PIECES = [
    "x",
    "model",
    " ",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\\n",
    '\\"',
    "\\\\",
    "\\/",
    "\\u00e9",
    "\\ud83d\\ude00",
    "\\u0022",
    "é",
    "€",
    "😀",
    '\\"model\\": \\"evil\\"',
]
BAD_TEXT_PIECES = ["\x01", "\\x", "\\u12", "\n", "\\", '"']


def string_literal(rng: random.Random, bad: bool) -> str:
    pieces = [rng.choice(TEXT_PIECES) for _ in range(rng.randrange(0, 12))]
    if bad:
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice(BAD_TEXT_PIECES))
    return '"' + "".join(pieces) + '"'


def value(rng: random.Random, depth: int) -> str:
    choice = rng.randrange(7 if depth < 4 else 4)
    if choice == 0:
        return rng.choice(["1", "-0.5e3", "true", "false", "null"])
    if choice in (1, 2, 3):
        return string_literal(rng, bad=rng.random() < 0.03)
    if choice == 4:
        return "[" + ", ".join(value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    return obj(rng, depth + 1)


def obj(rng: random.Random, depth: int) -> str:
    members = []
    for _ in range(rng.randrange(5)):
        key = '"model"' if rng.random() < 0.3 else string_literal(rng, bad=False)
        space = rng.choice(["", " ", "\n\t "])
        members.append(f"{key}{space}:{space}{value(rng, depth)}")
    return "{" + ",".join(members) + "}"


def document(rng: random.Random) -> bytes:
    text = obj(rng, 0)
    if rng.random() < 0.5:  # a top-level model, maybe among others of that name
        position = rng.choice([1, len(text) - 1])
        member = '"model": ' + string_literal(rng, bad=False)
        if len(text) > 2:
            member = member + "," if position == 1 else "," + member
        text = text[:position] + member + text[position:]
    return text.encode()


def corrupt(rng: random.Random, data: bytes) -> bytes:
    position = rng.randrange(len(data) + 1)
    choice = rng.randrange(4)
    if choice == 0 and data:
        index = rng.randrange(len(data))
        return data[:index] + bytes([rng.randrange(256)]) + data[index + 1 :]
    if choice == 1:
        return data[:position] + rng.choice([b'"', b"\\", b"\xc3", b"\x00", b"}"]) + data[position:]
    if choice == 2:
        return data[:position]
    return data[:position] + data[position + rng.randrange(1, 8) :]


@pytest.mark.usefixtures("tiny_thresholds")
def test_random_documents_route_as_json_loads_reads_them() -> None:
    rng = random.Random(SEED)
    shortened = 0
    for _ in range(DOCUMENTS):
        payload = document(rng)
        for candidate in (payload, corrupt(rng, payload)):
            assert routed(candidate) == reference(candidate), candidate
            shortened += llmhop._without_long_strings(candidate) is not None
    assert shortened > DOCUMENTS // 2  # the shortcut was taken, not only the fallback


@pytest.mark.usefixtures("tiny_thresholds")
@pytest.mark.parametrize(
    "payload",
    [
        b'{"model": "' + b"m" * 50 + b'"}',  # the model itself is a long string
        b'{"' + b"k" * 40 + b'": 1, "model": "a", "model": "b"}',  # the last one wins
        b'{"messages": [{"model": "nested"}], "x": "' + b"y" * 40 + b'"}',
        b'{"x": "' + b"\\\\" * 20 + b'", "model": "a"}',  # nothing but escapes
        b'{"x": "' + b"ab\\" + b'"}, "model": "a"}',  # an escaped quote at the end
        b'{"x": "' + b"\xc3\xa9" * 20 + b'", "model": "a"}',
        b'{"x": "' + b"\xe9" * 20 + b'", "model": "a"}',  # Latin-1, not UTF-8
        b'{"x": "' + b"\xed\xa0\x80" * 5 + b'", "model": "a"}',  # a lone surrogate, encoded
        b'\xef\xbb\xbf{"x": "' + b"y" * 40 + b'", "model": "a"}',  # a byte order mark
        '{"x": "long enough", "model": "a"}'.encode("utf-16-le"),
        b'{"x": "' + b"y" * 40 + b'", "model": "a"',  # cut short
        b'{"x": "' + b"y" * 40,  # inside a string
        b'["' + b"y" * 40 + b'"]',
        b'"' + b"y" * 40 + b'"',
        b'{"x": "' + b"y" * 40 + b'"} trailing',
        b'{"model": "a", "x": ' + b'"s", ' * 300 + b'"z": "' + b"y" * 40 + b'"}',  # many strings
    ],
)
def test_edge_cases_route_as_json_loads_reads_them(payload: bytes) -> None:
    assert routed(payload) == reference(payload)


def test_a_long_prompt_is_left_out_of_the_parse() -> None:
    prompt: Any = "Say hi. " * 20_000 + "é\\n" * 100
    payload = json.dumps({"messages": [{"role": "user", "content": prompt}], "model": "m"})
    shortened = llmhop._without_long_strings(payload.encode())
    assert shortened is not None and len(shortened) < 200
    assert llmhop.model_of_body(payload.encode()) == "m"


# --- the parser itself: json_document against json.loads ----------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

# What a client may put around or in place of a document: whitespace, other encodings,
# a byte order mark, trailing bytes, a cut, bytes that are not UTF-8.
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le"])
NOISE = st.sampled_from([b"", b" ", b"\n\t", b"\r\n", b"x", b"}", b"\x00", b"\xff", b"\xc3"])


def loads_outcome(parse: Any, payload: bytes) -> tuple[str, Any]:
    try:
        return ("document", parse(payload))
    except (ValueError, RecursionError):
        return ("error", None)


@settings(max_examples=400, deadline=None)
@given(
    value=JSON_VALUES,
    as_object=st.booleans(),
    encoding=ENCODINGS,
    before=NOISE,
    after=NOISE,
    cut=st.integers(min_value=0, max_value=8),
)
def test_json_document_is_json_loads(
    value: Any, as_object: bool, encoding: str, before: bytes, after: bytes, cut: int
) -> None:
    document = {"model": "m", "v": value} if as_object else value
    text = json.dumps(document, ensure_ascii=False, allow_nan=True)
    payload = before + text.encode(encoding, "surrogatepass") + after
    payload = payload[: len(payload) - cut] if cut % 3 == 0 and cut else payload
    ours, theirs = loads_outcome(llmhop.json_document, payload), loads_outcome(json.loads, payload)
    # NaN is not equal to itself: compare what json.dumps makes of both documents.
    assert json.dumps(ours) == json.dumps(theirs), payload
