"""`lmforge serve` as a real process, answered through the official `openai` client: a registry alias served
under a public name, chat and completions (streaming and not), `n`, `stop`, usage, concurrent requests, OpenAI
errors, and a moved @champion followed without a restart.

One server for the module (session-scoped startup costs ~20 s on 2 cores); the test that moves the alias runs last.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from components import tracking  # noqa: E402
from components.config import load_config  # noqa: E402
from components.registry import register_model  # noqa: E402
from tests.servers import free_port, running_server  # noqa: E402

NAME = "tiny-serve"
KEY = "test-key-not-secret"
CHAT = [{"role": "user", "content": "Which ICD-10-CM chapter contains code E11.9?"}]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of a tiny model in a SQLite registry, 1 @champion; 2's chat template adds a system line, so
    the same chat costs it more prompt tokens (random tiny models answer alike, whatever their seed)."""
    from transformers import AutoTokenizer

    from tests.tiny_model import CHATML, build_tiny_model

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config(None, [f"workspace={root / 'ws'}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "serve", root / "mlartifacts")
    for seed, alias in ((0, "champion"), (1, "challenger")):
        model_dir = build_tiny_model(root / f"model-{seed}", seed=seed)
        if alias == "challenger":
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            tokenizer.chat_template = "<|im_start|>system\nYou code diagnoses in ICD-10-CM.<|im_end|>\n" + CHATML
            tokenizer.save_pretrained(model_dir)
        files = sorted(p.name for p in model_dir.iterdir() if p.is_file())
        run_id = tracking.start_run(client, exp, "model")
        register_model(client, name=NAME, run_id=run_id, model_dir=model_dir, files=files, tags={}, alias=alias)
        tracking.end_run(client, run_id)
    return root, client


@pytest.fixture(scope="module")
def server(registry):
    root, _ = registry
    port = free_port()
    env = {**os.environ, "LMFORGE_API_KEY": KEY}
    command = [sys.executable, "-m", "flows.cli", "serve", f"models:/{NAME}@champion", "--port", str(port),
               "--follow-interval", "1", "--set", f"workspace={root / 'ws'}",
               "--backend-args", "--cb-num-blocks 64 --cb-max-batch-tokens 256"]  # a small KV cache warms up in ms
    log_path = root / "serve.log"
    with running_server(command, env, f"http://127.0.0.1:{port}/health", log_path):
        yield f"http://127.0.0.1:{port}/v1", log_path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_public_name_and_version(client):
    [model] = client.models.list().data
    assert model.id == f"{NAME}@champion" and model.owned_by == "lmforge"
    assert model.lmforge["version"] == "1" and model.lmforge["backend"] == "transformers"
    assert client.models.retrieve(f"{NAME}@champion").id == model.id


def test_chat_answers_with_usage_under_the_public_name(client):
    reply = client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, max_tokens=5, temperature=0)
    assert reply.model == f"{NAME}@champion" and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_n_answers_in_one_response(client):
    reply = client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, max_tokens=3, n=3, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 9


def test_completion_stops_at_a_stop_sequence(client):
    full = client.completions.create(model=f"{NAME}@champion", prompt="ICD-10-CM", max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and len(text) > 2 and full.usage.completion_tokens == 8
    stop = text[1:3]  # greedy is deterministic: the same text again, cut before its 2nd character
    cut = client.completions.create(model=f"{NAME}@champion", prompt="ICD-10-CM", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_temperature_and_seed_are_honoured(client):
    # The tiny model is saved greedy: its served view samples per request (see sampling_view).
    def complete(**kw) -> str:
        return client.completions.create(model=f"{NAME}@champion", prompt="ICD-10-CM", max_tokens=8, **kw).choices[0].text

    greedy = complete()  # no temperature: the model's own setting, greedy
    assert complete(temperature=0) == greedy
    sampled = complete(temperature=1.0, seed=3)
    assert sampled != greedy and complete(temperature=1.0, seed=3) == sampled


def test_streaming_chat_ends_with_done_and_usage(server, client):
    import httpx

    chunks = list(client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, max_tokens=4, stream=True,
                                                 n=2, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {f"{NAME}@champion"} and len({c.id for c in chunks}) == 1
    text = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in (0, 1)}
    plain = client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, max_tokens=4, temperature=0)
    assert text[0] == text[1] == plain.choices[0].message.content  # greedy: the same text, streamed or not
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    raw = httpx.post(f"{server[0]}/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": f"{NAME}@champion", "prompt": "ICD", "max_tokens": 3, "stream": True})
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_a_prompt_longer_than_a_step_is_prefilled_in_chunks_and_answers_as_the_model_does(registry, client):
    """On CPU a step takes at most --cb-max-batch-tokens tokens (lmforge's default 1024; this server's 256): a
    longer prompt is prefilled over several steps, and its greedy answer is the model's own in one pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = registry
    prompt = " ".join(f"E{n % 90 + 10}.{n % 7}" for n in range(60))
    served = client.completions.create(model=f"{NAME}@champion", prompt=prompt, max_tokens=6, temperature=0)
    assert served.usage.prompt_tokens > 256 and served.usage.completion_tokens == 6

    tokenizer = AutoTokenizer.from_pretrained(root / "model-0")
    model = AutoModelForCausalLM.from_pretrained(root / "model-0").eval()
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids["input_ids"].shape[1] == served.usage.prompt_tokens
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert served.choices[0].text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_eight_concurrent_requests_are_all_answered(client):
    def ask(i: int):
        return client.chat.completions.create(model=f"{NAME}@champion", max_tokens=6,
                                              messages=[{"role": "user", "content": f"code {i}"}])

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert [r.usage.completion_tokens for r in replies] == [6] * 8


def test_errors_are_openai_shaped(server, client):
    import httpx

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.body["code"] == "model_not_found" and f"{NAME}@champion" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=f"{NAME}@champion", messages=[])
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0).models.list()
    assert err.value.body["code"] == "invalid_api_key"
    keyless = httpx.post(f"{server[0]}/chat/completions", json={"model": f"{NAME}@champion", "messages": CHAT})
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    not_json = httpx.post(f"{server[0]}/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
    assert KEY not in server[1].read_text()  # the key is never logged


def test_reload_needs_the_key_and_does_nothing_while_the_alias_stays(server):
    import httpx

    assert httpx.post(f"{server[0][:-3]}/admin/reload", timeout=30).status_code == 401
    answer = httpx.post(f"{server[0][:-3]}/admin/reload", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.json() == {"model": f"{NAME}@champion", "version": "1", "switched": False}


def test_a_moved_champion_is_followed_without_a_restart(registry, client):
    _, registry_client = registry
    def prompt_tokens() -> int:
        return client.chat.completions.create(model=f"{NAME}@champion", messages=CHAT, max_tokens=1).usage.prompt_tokens

    before = prompt_tokens()
    registry_client.set_registered_model_alias(NAME, "champion", "2")
    deadline = time.monotonic() + 120
    while client.models.list().data[0].lmforge["version"] != "2":
        assert time.monotonic() < deadline, "the server did not switch to version 2"
        time.sleep(1)
    assert prompt_tokens() > before  # version 2's template renders the chat: it serves now
