"""The front of `lmforge serve`: a FastAPI app that checks the API key, maps the public model name to the
backend's, validates requests, fans `n` out, applies `stop`, proxies streams (ending in `data: [DONE]`), answers
/v1/models and errors itself, and switches to a new registry version while serving (`Gateway.switch_to`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from components.serving.openai_shapes import (
    APIError,
    StopScanner,
    merge_responses,
    stop_list,
    upstream_error,
    validate_request,
)

log = logging.getLogger(__name__)


@dataclass
class Route:
    """Where requests for the public name go now."""

    name: str
    backend: object  # BackendProcess (or anything with base_url, command.upstream_model/backend, stop())
    version: str | None = None
    spec: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests in flight on this backend: the old one is stopped once they end

    @property
    def base_url(self) -> str:
        return self.backend.base_url

    @property
    def upstream_model(self) -> str:
        return self.backend.command.upstream_model


class Gateway:
    """The served route, and the switch from one backend to the next.

    `start_version(version)` builds and starts a backend for a registry version (blocking; run in a thread);
    `current_version()` reads the alias. Both are None for a fixed model (nothing to follow).
    """

    def __init__(self, route: Route, *, api_key: str | None = None,
                 start_version: Callable[[str], Route] | None = None,
                 current_version: Callable[[], str] | None = None, follow_interval: float = 0.0,
                 drain_timeout: float = 120.0):
        self.route, self.api_key = route, api_key
        self.start_version, self.current_version = start_version, current_version
        self.follow_interval, self.drain_timeout = follow_interval, drain_timeout
        self.switch_lock = asyncio.Lock()
        self.failed_version: str | None = None  # not retried by the poller until the alias moves again
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
        self.background: set[asyncio.Task] = set()
        self.on_shutdown: list[Callable[[], None]] = []  # uvicorn re-raises SIGTERM after the lifespan: stop here

    # ---- following the alias ----

    async def follow(self) -> None:
        """Poll the alias every `follow_interval` s; switch when it points elsewhere."""
        while True:
            await asyncio.sleep(self.follow_interval)
            try:
                await self.reload(from_poll=True)
            except Exception as exc:  # the registry may be briefly unreachable: keep serving, try next time
                log.warning("following %s: %s", self.route.name, exc)

    async def reload(self, *, from_poll: bool = False) -> dict:
        """Switch to the version the alias points at, if it moved; returns {model, version, switched}."""
        if self.current_version is None or self.start_version is None:
            raise APIError(400, f"{self.route.name} is a fixed model, not a registry alias: nothing to reload")
        async with self.switch_lock:
            version = await asyncio.to_thread(self.current_version)
            if version == self.route.version or (from_poll and version == self.failed_version):
                return {"model": self.route.name, "version": self.route.version, "switched": False}
            log.info("%s moved to version %s (serving %s): starting it", self.route.name, version, self.route.version)
            try:
                new = await asyncio.to_thread(self.start_version, version)
            except Exception as exc:
                self.failed_version = version
                log.error("version %s of %s did not start; still serving version %s: %s",
                          version, self.route.name, self.route.version, exc)
                raise APIError(500, f"version {version} did not start; still serving version "
                                    f"{self.route.version}: {exc}") from None
            old, self.route, self.failed_version = self.route, new, None
            log.info("now serving %s version %s", new.name, new.version)
            self.spawn(self._retire(old))
            return {"model": new.name, "version": new.version, "switched": True}

    async def _retire(self, old: Route) -> None:
        """Stop a replaced backend once its requests in flight have ended (or after drain_timeout)."""
        deadline = time.monotonic() + self.drain_timeout
        while old.active and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.to_thread(old.backend.stop)

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ---- requests ----

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key given to "
                                "lmforge serve (--api-key or LMFORGE_API_KEY)", code="invalid_api_key")

    def route_for(self, name: str) -> Route:
        if name != self.route.name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {self.route.name!r}",
                           param="model", code="model_not_found")
        return self.route

    def model_card(self) -> dict:
        r = self.route
        return {"id": r.name, "object": "model", "created": r.created, "owned_by": "lmforge",
                "lmforge": {"version": r.version, "spec": r.spec, "backend": r.backend.command.backend}}

    def upstream_bodies(self, body: dict, route: Route, n: int) -> list[dict]:
        """The single-choice request each of the `n` answers is generated by (the backend ignores `n` and
        applies `stop` itself only outside continuous batching, so the front does both)."""
        one = {k: v for k, v in body.items() if k not in ("n", "stop")}
        one["model"] = route.upstream_model
        defaults = dict(route.backend.command.request_defaults)
        if "top_k" in defaults:  # not an OpenAI field: sent the transformers serve way
            given = json.loads(one.get("generation_config") or "{}")
            one["generation_config"] = json.dumps({"top_k": defaults.pop("top_k"), **given})
        for name, value in defaults.items():
            if one.get(name) is None:
                one[name] = value
        if body.get("stream"):
            one["stream_options"] = {"include_usage": True}  # summed over the n answers, sent if asked
        bodies = []
        for i in range(n):
            b = dict(one)
            if n > 1 and body.get("seed") is not None:
                b["seed"] = body["seed"] + i  # the same seed would give n equal samples
            bodies.append(b)
        return bodies

    async def complete(self, body: dict, path: str):
        route = self.route_for(body["model"])
        n = body.get("n") or 1
        response_id = ("chatcmpl-" if path.endswith("chat/completions") else "cmpl-") + uuid.uuid4().hex
        route.active += 1
        handed_over = False  # to the stream, which ends the request when it ends
        try:
            requests = [self.client.build_request("POST", route.base_url + path, json=b)
                        for b in self.upstream_bodies(body, route, n)]
            if not body.get("stream"):
                answers = await asyncio.gather(*(self.client.send(r) for r in requests))
                for a in answers:
                    if a.status_code != 200:
                        raise upstream_error(a.status_code, _payload(a.content))
                merged = merge_responses([a.json() for a in answers], public_model=route.name,
                                         response_id=response_id, stops=stop_list(body))
                return JSONResponse(merged)
            streams = await asyncio.gather(*(self.client.send(r, stream=True) for r in requests), return_exceptions=True)
            if any(isinstance(s, BaseException) for s in streams):
                for s in streams:
                    if isinstance(s, httpx.Response):
                        await s.aclose()
                raise next(s for s in streams if isinstance(s, BaseException))
            failed = next((s for s in streams if s.status_code != 200), None)
            if failed is not None:
                content = await failed.aread()
                for s in streams:
                    await s.aclose()
                raise upstream_error(failed.status_code, _payload(content))
            handed_over = True
        except httpx.HTTPError as exc:  # the backend is gone or restarting
            raise APIError(503, f"the {route.backend.command.backend} backend did not answer: {exc!r}") from None
        finally:
            if not handed_over:
                route.active -= 1
        events = self._merged_stream(streams, route, response_id, body)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _merged_stream(self, streams: list[httpx.Response], route: Route, response_id: str,
                             body: dict) -> AsyncIterator[str]:
        """The `n` backend streams as one OpenAI stream: choice i's chunks carry index i, stop sequences end a
        choice (and its generation), one usage chunk if asked, then `data: [DONE]`."""
        queue: asyncio.Queue = asyncio.Queue()
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        chat = "chat" in response_id

        async def pump(i: int, stream: httpx.Response) -> None:
            scanner, pieces = StopScanner(stop_list(body)), 0
            try:
                async for line in stream.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("usage") and not chunk.get("choices"):
                        usage["prompt_tokens"] = chunk["usage"].get("prompt_tokens", 0)
                        usage["completion_tokens"] += chunk["usage"].get("completion_tokens", 0)
                        continue
                    for choice in chunk.get("choices", []):
                        choice["index"] = i
                        text = _text_of(choice, chat)
                        if text:
                            pieces += 1
                            _set_text(choice, chat, scanner.feed(text))
                        if scanner.stopped:  # the stop sequence ends this choice: stop its generation too
                            choice["finish_reason"] = "stop"
                            await queue.put(chunk)
                            usage["completion_tokens"] += pieces
                            return
                        held = scanner.flush() if choice.get("finish_reason") else ""
                        if held:
                            _set_text(choice, chat, (_text_of(choice, chat) or "") + held)
                    await queue.put(chunk)
            finally:
                await stream.aclose()
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        created = int(time.time())
        try:
            done = 0
            while done < len(tasks):
                chunk = await queue.get()
                if chunk is None:
                    done += 1
                    continue
                chunk.update(id=response_id, model=route.name)
                yield f"data: {json.dumps(chunk)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                tail = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": route.name, "choices": [], "usage": usage}
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            route.active -= 1


def _payload(content: bytes) -> object:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500]


def _text_of(choice: dict, chat: bool) -> str | None:
    return (choice.get("delta") or {}).get("content") if chat else choice.get("text")


def _set_text(choice: dict, chat: bool, text: str) -> None:
    if chat:
        choice.setdefault("delta", {})["content"] = text
    else:
        choice["text"] = text


def build_app(gateway: Gateway) -> FastAPI:
    """The front's routes. /health is open; everything else needs the key when one is set."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if gateway.follow_interval > 0 and gateway.current_version is not None:
            gateway.spawn(gateway.follow())
        yield
        for task in list(gateway.background):
            task.cancel()
        await gateway.client.aclose()
        for stop in gateway.on_shutdown:
            await asyncio.to_thread(stop)

    app = FastAPI(lifespan=lifespan, title="lmforge serve")

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if request.url.path != "/health":
            try:
                gateway.check_key(request)
            except APIError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def read_json(request: Request) -> object:
        try:
            return json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"the request body is not JSON: {exc}") from None

    @app.get("/health")
    async def health():
        route = gateway.route
        process = getattr(route.backend, "process", None)
        if process is not None and process.poll() is not None:
            return JSONResponse({"status": "backend exited", "model": route.name}, status_code=503)
        return {"status": "ok", "model": route.name, "version": route.version}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [gateway.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        gateway.route_for(name)
        return gateway.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await gateway.complete(validate_request(await read_json(request), "chat"), "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await gateway.complete(validate_request(await read_json(request), "completion"), "/v1/completions")

    @app.post("/admin/reload")
    async def reload():
        return await gateway.reload()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(path: str):
        raise APIError(404, f"no route /{path}: this server answers /v1/models, /v1/chat/completions, "
                            "/v1/completions, /admin/reload and /health", code="not_found")

    return app
