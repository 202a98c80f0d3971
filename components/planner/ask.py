"""Natural-language mode of `lmforge plan --ask`: a sentence to a PlanRequest through an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import os

from components.planner.recommend import PlanRequest

API_KEY_ENV = "LMFORGE_LLM_API_KEY"


def ask_llm(sentence: str, base_url: str, model: str, *, timeout_s: float = 60.0) -> PlanRequest:
    """Fill a PlanRequest from a sentence through an OpenAI-compatible chat endpoint.

    The answer is constrained by the request's JSON schema (response_format json_schema); the key
    comes from LMFORGE_LLM_API_KEY and is only ever sent in the Authorization header.
    """
    import requests

    schema = PlanRequest.model_json_schema()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {
        "model": model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You turn a request to fine-tune a language model into the JSON "
             "settings of the lmforge planner. Use the schema's defaults for anything the user does not say. "
             "Hub ids look like Qwen/Qwen2.5-7B-Instruct."},
            {"role": "user", "content": sentence},
        ],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "lmforge_plan_request", "schema": schema, "strict": False}},
    }
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        resp = requests.post(url, json=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise ValueError(f"LLM endpoint {url} did not answer: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise ValueError(f"LLM endpoint {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        content = resp.json()["choices"][0]["message"]["content"]
        answer = json.loads(content) if isinstance(content, str) else content
        return PlanRequest.model_validate(answer)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"LLM endpoint {url} gave no usable plan settings ({exc}); answer: {resp.text[:300]}") from None
