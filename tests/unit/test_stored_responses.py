"""Stored responses are found by id, for as many ids as the gateway keeps."""

from __future__ import annotations

import pytest

from vllm_autoserve.errors import NotFound
from vllm_autoserve.stored_responses import StoredResponses, names_one


def test_ids_are_noted_from_whole_and_streamed_answers_and_the_oldest_forgotten() -> None:
    stored = StoredResponses(keep=2)
    stored.note(b'{"id":"resp_a1","object":"response"', "m1")
    stored.note(b'event: response.created\ndata: {"response":{"id": "resp_b2"', "m2")
    stored.note(b'{"error": {"message": "no id here"}}', "m3")
    assert stored.model_of("/v1/responses/resp_a1") == "m1"
    assert stored.model_of("/v1/responses/resp_b2/cancel") == "m2"
    stored.note(b'{"id":"resp_c3"}', "m3")
    with pytest.raises(NotFound, match="resp_a1"):
        stored.model_of("/v1/responses/resp_a1")  # the oldest, beyond what is kept


def test_only_paths_naming_a_response_id_are_routed_by_it() -> None:
    assert names_one("/v1/responses/resp_a1") and names_one("/v1/responses/resp_a1/cancel")
    assert not names_one("/v1/responses/input_tokens")  # names its model in the body
    assert not names_one("/v1/responses")
