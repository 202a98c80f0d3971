"""The OpenAI request checks and response pieces the front adds to its backend: errors in OpenAI's shape,
request validation (400 with the field named), `stop` sequences and merging the `n` answers of one request."""

from __future__ import annotations

import json
import math

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16


class APIError(Exception):
    """An error the front answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise bad(name, f"{value!r} is out of range ({'(' if low_open else '['}{low}, {high}])")


def validate_request(body: object, endpoint: str) -> dict:
    """Check a chat (`endpoint` "chat") or completion ("completion") request; raise APIError(400) naming the
    field. Returns the body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model", "required: the served model's name (GET /v1/models lists it)")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "required: a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), (str, list)) and not (m["role"] == "assistant" and m.get("tool_calls")):
                raise bad(f"messages[{i}].content", "must be a string or a list of content parts")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            body["prompt"] = prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt", "required: a string (one prompt per request)")
    for name in ("max_tokens", "max_completion_tokens"):
        _number(body, name, 1, 1 << 20, integer=True)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1, low_open=True)
    _number(body, "n", 1, MAX_N, integer=True)
    _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                           and all(isinstance(s, str) and s for s in stop))):
        raise bad("stop", "must be a string or a list of up to 4 non-empty strings")
    extension = body.get("generation_config")  # transformers serve's: generate() settings as a JSON object string
    if extension is not None:
        try:
            if not isinstance(json.loads(extension), dict):
                raise ValueError
        except (TypeError, ValueError):
            raise bad("generation_config", "must be a string holding a JSON object") from None
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad("stream", "must be true or false")
    return body


def stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) and stop else list(stop or [])


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence (excluded, as OpenAI does) and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Streams text through, holding back the tail that could still begin a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        """The text that can be sent now; after a stop sequence, nothing more (`stopped` is then True)."""
        if self.stopped:
            return ""
        self.pending += text
        kept, self.stopped = cut_at_stop(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return kept
        out, self.pending = (self.pending[:-self.hold], self.pending[-self.hold:]) if self.hold else (self.pending, "")
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def merge_responses(responses: list[dict], *, public_model: str, response_id: str, stops: list[str]) -> dict:
    """The `n` single-choice answers of one request as one OpenAI response: choices renumbered, stop sequences
    applied, usage summed (the prompt counted once)."""
    merged = dict(responses[0], id=response_id, model=public_model)
    choices, completion_tokens = [], 0
    for i, response in enumerate(responses):
        choice = dict(response["choices"][0], index=i)
        if stops:
            if "message" in choice:
                message = dict(choice["message"])
                message["content"], hit = cut_at_stop(message.get("content") or "", stops)
                choice["message"] = message
            else:
                choice["text"], hit = cut_at_stop(choice.get("text") or "", stops)
            if hit:
                choice["finish_reason"] = "stop"
        choices.append(choice)
        completion_tokens += (response.get("usage") or {}).get("completion_tokens", 0)
    merged["choices"] = choices
    prompt_tokens = (responses[0].get("usage") or {}).get("prompt_tokens", 0)
    merged["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens}
    return merged


def upstream_error(status: int, payload: object) -> APIError:
    """A backend's error answer (transformers serve: {"detail": ...} or {"error": ...}) in OpenAI's shape."""
    message = payload
    if isinstance(payload, dict):
        message = payload.get("detail") or payload.get("error") or payload
        if isinstance(message, dict):
            message = message.get("message", message)
    if status in (400, 422):
        return APIError(400, f"the backend refused the request: {message}")
    return APIError(503 if status == 503 else 502, f"the backend failed ({status}): {message}")
