"""Finding the model a request names: the `model` field of a multipart form exactly, and
an alias replaced in both kinds of body."""

from __future__ import annotations

import orjson
import pytest

from vllm_autoserve.errors import BadRequest
from vllm_autoserve.inbound import model_of, with_model

FORM = b"multipart/form-data; boundary=XyZ"


def form(*parts: tuple[bytes, bytes]) -> bytes:
    body = b"".join(b"--XyZ\r\n" + head + b"\r\n\r\n" + value + b"\r\n" for head, value in parts)
    return body + b"--XyZ--\r\n"


def field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', value


AUDIO = (
    b'Content-Disposition: form-data; name="file"; filename="model"\r\nContent-Type: audio/wav',
    b"RIFF\r\n--Xy\r\n\x00\xff",
)


@pytest.mark.parametrize(
    "body",
    [
        form(field(b"model", b"org/whisper"), field(b"language", b"en"), AUDIO),  # the SDK's order
        form(AUDIO, field(b"language", b"en"), field(b"model", b"org/whisper")),
        form((b"content-disposition: form-data;name=model", b"org/whisper"), AUDIO),
        b"preamble\r\n" + form(field(b"model_size", b"big"), field(b"model", b"org/whisper")),
    ],
    ids=["model-first", "model-last", "unquoted", "similar-name"],
)
def test_the_model_field_of_a_form_is_read_exactly(body: bytes) -> None:
    model, where = model_of(body, FORM)
    assert model == "org/whisper"
    renamed = with_model(body, "org/whisper-large", where, model)
    assert model_of(renamed, FORM)[0] == "org/whisper-large"
    assert renamed.replace(b"org/whisper-large", b"org/whisper") == body


@pytest.mark.parametrize(
    "body",
    [form(AUDIO, field(b"language", b"en")), form(AUDIO)[:-9], b"", b"--XyZ\r\n"],
    ids=["no-model-field", "cut-body", "empty", "cut-head"],
)
def test_a_form_without_a_model_field_is_a_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="'model' is required"):
        model_of(body, FORM)


def test_a_form_naming_the_model_twice_is_a_400() -> None:
    # The gateway would route by one and the engine (Starlette) read the other.
    body = form(field(b"model", b"a"), AUDIO, field(b"model", b"b"))
    with pytest.raises(BadRequest, match="twice"):
        model_of(body, FORM)


def test_a_form_of_too_many_parts_is_refused_before_it_costs_much() -> None:
    body = form(field(b"model", b"m"), *[field(b"x", b"")] * 1000)
    with pytest.raises(BadRequest, match="over 1000 parts"):
        model_of(body, FORM)


def test_a_quoted_boundary_is_understood() -> None:
    body = form(field(b"model", b"m"))
    assert model_of(body, b'multipart/form-data; boundary="XyZ"')[0] == "m"


def test_an_alias_in_json_is_replaced_and_every_other_byte_kept() -> None:
    body = b'{"model" :\t"alias", "seed": 123456789012345678901234567890, "t": 0.1000}'
    model, where = model_of(body, b"application/json")
    assert (model, where) == ("alias", None)
    assert with_model(body, "org/m", where, model) == (
        b'{"model" :\t"org/m", "seed": 123456789012345678901234567890, "t": 0.1000}'
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"metadata": {"model": "alias"}, "model": "alias", "n": 1}',  # a nested key too
        b'{"model": "other", "model": "alias", "n": 1}',  # repeated: the last one counts
        b'{"model": "\\u0061lias", "n": 1}',  # written escaped
        b'{"mod\\u0065l": "alias", "metadata": {"model": "alias"}, "n": 1}',  # key escaped
    ],
    ids=["nested", "repeated", "escaped", "escaped-key"],
)
def test_an_alias_is_replaced_at_the_top_level_only_however_it_is_written(body: bytes) -> None:
    model, where = model_of(body, b"application/json")
    assert model == "alias"
    renamed = orjson.loads(with_model(body, "org/m", where, model))
    assert renamed["model"] == "org/m" and renamed["n"] == 1
    assert renamed.get("metadata", {"model": "alias"}) == {"model": "alias"}


@pytest.mark.parametrize("stream", [True, False, 0, 1, 1.0, "true", "False", "0", "yes", "off"])
def test_stream_is_taken_as_vllm_takes_a_boolean(stream: object) -> None:
    body = orjson.dumps({"model": "m", "stream": stream})
    assert model_of(body, b"application/json")[0] == "m"


@pytest.mark.parametrize("stream", [2, 0.5, "1.0", " true", "streaming", [], {}])
def test_stream_that_vllm_would_refuse_is_a_400_naming_it(stream: object) -> None:
    body = orjson.dumps({"model": "m", "stream": stream})
    with pytest.raises(BadRequest) as refused:
        model_of(body, b"application/json")
    assert refused.value.param == "stream"
