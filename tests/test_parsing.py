"""Body decoding: a value, or a BadRequest with a stable code; never anything else."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.body import BadRequest, decode_body, json_depth


def test_json_object_and_charset_variants() -> None:
    for ctype in (
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/cloudevents+json",
        "text/plain;charset=UTF-8",
        None,
        "",
    ):
        assert decode_body(b'{"a": [1, {"b": null}]}', ctype, max_depth=8, allow_text=False) == {
            "a": [1, {"b": None}]
        }


def test_bom_is_tolerated() -> None:
    assert decode_body(
        b'\xef\xbb\xbf{"a": 1}', "application/json", max_depth=8, allow_text=False
    ) == {"a": 1}


@pytest.mark.parametrize(
    ("body", "ctype", "code"),
    [
        (b"", "application/json", "empty-body"),
        (b"  \n", "application/json", "empty-body"),
        (b"{", "application/json", "invalid-json"),
        (b"\xc3\x28", "application/json", "invalid-utf8"),
        (b"[[[[]]]]", "application/json", "too-deep"),
        (b"{}", "multipart/form-data; boundary=x", "unsupported-media-type"),
        (b"{}", "application/json; charset=utf-16", "unsupported-charset"),
        (b"hello", "application/json", "invalid-json"),
    ],
)
def test_each_bad_body_has_its_code(body: bytes, ctype: str, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_body(body, ctype, max_depth=3, allow_text=False)
    assert info.value.code == code
    assert info.value.status in (400, 415)


def test_plain_text_is_returned_only_when_allowed_and_not_declared_json() -> None:
    assert decode_body(b"user reached step 3", "text/plain", max_depth=8, allow_text=True) == (
        "user reached step 3"
    )
    with pytest.raises(BadRequest):
        decode_body(b"user reached step 3", "application/json", max_depth=8, allow_text=True)


def test_depth_is_measured_without_recursion() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep, 64) == 65  # stops counting past the limit
    assert json_depth({"a": {"b": [1]}}, 64) == 3
    assert json_depth(5, 64) == 0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(json_values)
def test_valid_json_round_trips(value: object) -> None:
    body = orjson.dumps(value)
    try:
        out = decode_body(body, "application/json", max_depth=64, allow_text=False)
    except BadRequest as exc:
        assert exc.code in ("empty-body", "too-deep")
        return
    assert out == orjson.loads(body)


@settings(max_examples=500)
@given(
    st.binary(max_size=300), st.sampled_from(["application/json", "text/plain", None, "text/html"])
)
def test_any_bytes_give_a_value_or_a_bad_request(body: bytes, ctype: str | None) -> None:
    try:
        decode_body(body, ctype, max_depth=16, allow_text=ctype == "text/plain")
    except BadRequest as exc:
        assert exc.status in (400, 415) and exc.code and exc.message
