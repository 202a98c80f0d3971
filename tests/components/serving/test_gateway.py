"""What the front sends its backend for one OpenAI request (no server: the request bodies only)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from components.serving.backends import NO_TOP_K, BackendCommand
from components.serving.gateway import Gateway, Route


def gateway(defaults: dict) -> Gateway:
    command = BackendCommand("transformers", [], "/health", "/models/coder", defaults)
    return Gateway(Route("coder@champion", SimpleNamespace(base_url="http://127.0.0.1:1", command=command)))


def test_n_becomes_n_requests_with_their_own_seeds_and_no_stop():
    gw = gateway({})
    body = {"model": "coder@champion", "prompt": "x", "n": 3, "seed": 10, "stop": ["\n"], "stream": True}
    bodies = gw.upstream_bodies(body, gw.route, 3)
    assert [b["seed"] for b in bodies] == [10, 11, 12]
    assert all(b["model"] == "/models/coder" and "n" not in b and "stop" not in b for b in bodies)
    assert bodies[0]["stream_options"] == {"include_usage": True}


def test_omitted_sampling_settings_are_the_models_own():
    gw = gateway({"temperature": 0.0, "top_p": 1.0, "top_k": NO_TOP_K})
    [greedy] = gw.upstream_bodies({"model": "coder@champion", "prompt": "x"}, gw.route, 1)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert json.loads(greedy["generation_config"]) == {"top_k": NO_TOP_K}
    [sampled] = gw.upstream_bodies({"model": "coder@champion", "prompt": "x", "temperature": 0.8}, gw.route, 1)
    assert sampled["temperature"] == 0.8
