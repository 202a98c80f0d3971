"""The front's own OpenAI pieces: request checks (400 naming the field), stop sequences, merging `n` answers."""

from __future__ import annotations

import pytest

from components.serving.openai_shapes import APIError, StopScanner, cut_at_stop, merge_responses, validate_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": ""}, "model"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 17}, "n"),
    ({"n": True}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"generation_config": "{not json"}, "generation_config"),
    ({"generation_config": {"top_k": 5}}, "generation_config"),
])
def test_a_bad_chat_request_names_its_field(change, param):
    with pytest.raises(APIError) as err:
        validate_request({**CHAT, **change}, "chat")
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_a_completion_needs_one_string_prompt():
    assert validate_request({"model": "m", "prompt": ["one"]}, "completion")["prompt"] == "one"
    for prompt in (None, ["a", "b"], 3):
        with pytest.raises(APIError, match="prompt"):
            validate_request({"model": "m", "prompt": prompt}, "completion")
    with pytest.raises(APIError, match="JSON object"):
        validate_request([1], "chat")


def test_stop_sequences_cut_before_the_first_one():
    assert cut_at_stop("abc END def STOP", ["STOP", "END"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_the_stream_holds_back_what_may_begin_a_stop_sequence():
    scanner = StopScanner(["END"])
    sent = [scanner.feed(piece) for piece in ("ab", "cE", "N", "D tail")]
    assert "".join(sent) == "abc" and scanner.stopped and scanner.feed("more") == ""
    scanner = StopScanner(["END"])
    assert scanner.feed("abE") == "a" and scanner.flush() == "bE"  # no stop: the held tail is sent at the end


def test_n_answers_merge_into_one_response_with_summed_usage():
    def answer(text):
        return {"id": "x", "object": "chat.completion", "model": "/path", "choices": [
            {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}

    merged = merge_responses([answer("one STOP two"), answer("three")], public_model="coder@champion",
                             response_id="chatcmpl-1", stops=["STOP"])
    assert merged["model"] == "coder@champion" and merged["id"] == "chatcmpl-1"
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in merged["choices"]] == [
        (0, "one ", "stop"), (1, "three", "length")]
    assert merged["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


def test_backend_errors_in_openai_shape():
    from components.serving.openai_shapes import upstream_error

    refused = upstream_error(422, {"detail": "Unexpected fields in the request: {'foo'}"})
    assert refused.status == 400 and "foo" in refused.message and refused.type == "invalid_request_error"
    assert upstream_error(500, "Internal Server Error").status == 502
    assert upstream_error(503, {"error": "engine dead"}).body()["error"]["type"] == "server_error"
