"""The inference server behind `lmforge serve`: which one, the command that starts it, and its process.

Each backend is an existing OpenAI-compatible server run as a subprocess on an internal 127.0.0.1 port:
`transformers serve` (default; `--continuous-batching` batches concurrent requests), llama.cpp's
`python -m llama_cpp.server` for a GGUF file, `vllm serve` on a CUDA GPU. Writing our own generation loop
would duplicate what they do (batching, paged KV cache, chat templates, stop tokens) less well.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "llamacpp", "vllm")
# Never handed to the backend: it listens on loopback only, and the key is the front's business.
PRIVATE_ENV = ("LMFORGE_API_KEY",)


class BackendError(RuntimeError):
    """The backend cannot run here or did not start; the message says what to install or read."""


@dataclass(frozen=True)
class BackendCommand:
    """How to start one backend: argv, the URL path that answers 200 once it serves, the `model` value
    requests must carry upstream, and the sampling settings the front fills in when a request omits them."""

    backend: str
    argv: list[str]
    health_path: str
    upstream_model: str
    request_defaults: dict = field(default_factory=dict)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    from components.models.loading import cuda_available as available

    return available()


def choose_backend(requested: str, *, is_gguf: bool) -> str:
    """The backend for `requested` (auto|transformers|llamacpp|vllm) and the model's format, or a BackendError
    naming what to install."""
    if requested not in BACKENDS:
        raise BackendError(f"--backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if is_gguf:
        if requested not in ("auto", "llamacpp"):
            raise BackendError(f"a .gguf file is served by llama.cpp, not {requested}: use --backend llamacpp, or "
                               "serve the quantize stage's dir (its merged checkpoint) with transformers")
        if not importable("llama_cpp"):
            raise BackendError("serving a .gguf file needs llama.cpp's server: pip install 'llama-cpp-python[server]' "
                               "(an sdist: apt-get install -y cmake build-essential first)")
        return "llamacpp"
    if requested == "llamacpp":
        raise BackendError("--backend llamacpp serves a .gguf file (the quantize stage writes one under gguf/)")
    if requested == "vllm" or (requested == "auto" and importable("vllm") and cuda_available()):
        if not importable("vllm"):
            raise BackendError("--backend vllm needs vLLM: pip install vllm (CUDA GPU machines only)")
        if not cuda_available():
            raise BackendError("--backend vllm needs a CUDA GPU; use --backend transformers on this machine")
        return "vllm"
    if not importable("openai"):  # transformers serve refuses to start without it
        raise BackendError("the transformers backend needs transformers' serving extra: pip install -e '.[serve]'")
    return "transformers"


# Any top-k wider than a vocabulary: "no top-k" for a request (OpenAI has none), yet a number the per-request
# top-k of continuous batching takes.
NO_TOP_K = 1 << 20


def sampling_view(directory: Path, views_root: Path) -> tuple[Path, dict]:
    """A directory transformers serve can sample per request from, and the settings a request without its own
    gets (the model's: greedy for a model saved greedy).

    Under continuous batching (transformers 5.25) a request's temperature, top-p and top-k apply only when the
    model's generation config sets them (and samples): a model saved greedy would ignore `temperature`. The view
    is the directory's files linked, with a generation config that samples; the front then sends each request's
    settings, the model's defaults in place of the ones it omits.
    """
    directory = Path(directory)
    config_file = directory / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    sampled = bool(config.get("do_sample"))
    defaults = {"temperature": float(config.get("temperature") or 1.0) if sampled else 0.0,
                "top_p": float(config.get("top_p") or 1.0) if sampled else 1.0,
                "top_k": int(config.get("top_k") or NO_TOP_K) if sampled else NO_TOP_K}
    key = hashlib.sha256(f"{directory.resolve()}\n{json.dumps(config, sort_keys=True)}".encode()).hexdigest()[:16]
    view = Path(views_root) / key
    if not (view / "generation_config.json").is_file():
        tmp = view.with_name(f".{key}.{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for entry in directory.iterdir():
            if entry.name != "generation_config.json" and not (tmp / entry.name).exists():
                (tmp / entry.name).symlink_to(entry.resolve())
        # Placeholders that are not "off" (1.0, None): each makes its per-request processor exist.
        (tmp / "generation_config.json").write_text(json.dumps(
            {**config, "do_sample": True, "temperature": 0.5, "top_p": 0.5, "top_k": 50}, indent=2))
        try:
            tmp.rename(view)
        except OSError:  # another process made it meanwhile
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return view, defaults


# transformers serve's continuous batching sizes itself for a GPU; on CPU lmforge passes its own three settings
# (each only where --backend-args does not set it):
# - the paged cache's block: 8 tokens, not 256. Requests share cached prompt prefixes a whole block at a time, and
#   a 256-token block is longer than any chat template's system prompt, so nothing was shared; at 8 tokens the
#   demo's 24-token template prefix is computed once (one client 1.6x faster: 10.9 against 6.9 tokens/s).
# - the cache's size: CPU_KV_CACHE_TOKENS tokens (fewer for a model whose cache would pass CPU_KV_CACHE_BYTES),
#   not 80% of the machine's free RAM, which is what transformers sizes it from on CPU: the demo's 135M model took
#   13.1 GB of a 23 GB machine, zero-filled at start, and was the OOM killer's pick as soon as anything else ran.
# - at most 1024 tokens a step, not 8192: a step keeps an attention-mask buffer of max_batch_tokens x (cache +
#   max_batch_tokens) floats (the demo's engine: 3.2 GB resident at 8192, 2.0 GB at 1024), and a CPU step of 1024
#   tokens already takes seconds, so longer prompts prefill in chunks at no cost in throughput.
CPU_CB_BLOCK_SIZE = 8
CPU_KV_CACHE_TOKENS = 32768
CPU_KV_CACHE_BYTES = 2 * 1024**3
CPU_MAX_BATCH_TOKENS = 1024


def _option(argv: tuple[str, ...], name: str) -> str | None:
    """The value `argv` gives option `name` (`--name V` or `--name=V`), else None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def kv_bytes_per_token(directory: str) -> int | None:
    """Bytes the paged cache keeps per token for the model in `directory` (keys and values of every layer, at the
    width it was saved in, 4 bytes where unknown); None where its config.json does not say. The config is read
    as the planner reads it (components.planner.memory.shape_from_config), plus an explicit head_dim."""
    from components.planner.memory import shape_from_config

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
        shape = shape_from_config(str(directory), config)
        text = config.get("text_config", config)
        head_dim = text.get("head_dim") or shape.hidden // shape.heads
        width = {"float16": 2, "bfloat16": 2}.get(text.get("dtype") or text.get("torch_dtype"), 4)
        return 2 * shape.layers * shape.kv_heads * head_dim * width
    except (OSError, ValueError, TypeError, AttributeError, ZeroDivisionError):
        return None


def cpu_batching_arguments(directory: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The CPU settings above that `extra` (the user's --backend-args) leaves unset."""
    argv: list[str] = []
    block = _option(extra, "--cb-block-size")
    if block is None:
        argv += ["--cb-block-size", str(CPU_CB_BLOCK_SIZE)]
    if _option(extra, "--cb-num-blocks") is None and _option(extra, "--cb-max-memory-percent") is None:
        per_token = kv_bytes_per_token(directory)
        tokens = CPU_KV_CACHE_TOKENS if per_token is None else min(CPU_KV_CACHE_TOKENS, CPU_KV_CACHE_BYTES // per_token)
        argv += ["--cb-num-blocks", str(max(1, tokens // int(block or CPU_CB_BLOCK_SIZE)))]
    if _option(extra, "--cb-max-batch-tokens") is None:
        argv += ["--cb-max-batch-tokens", str(CPU_MAX_BATCH_TOKENS)]
    return argv


def transformers_command(directory: str, port: int, *, continuous_batching: bool = True,
                         extra: tuple[str, ...] = (), request_defaults: dict | None = None) -> BackendCommand:
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", directory,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if continuous_batching:
        argv.append("--continuous-batching")
        if not cuda_available():
            argv += cpu_batching_arguments(directory, extra)
    # it wants the path as `model`
    return BackendCommand("transformers", [*argv, *extra], "/health", directory, request_defaults or {})


def llamacpp_command(gguf_file: str, port: int, *, extra: tuple[str, ...] = ()) -> BackendCommand:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_file, "--model_alias", gguf_file,
            "--host", "127.0.0.1", "--port", str(port)]
    return BackendCommand("llamacpp", [*argv, *extra], "/v1/models", gguf_file)


def vllm_command(source: str, port: int, *, adapters: tuple[str, ...] = (), served_name: str = "model",
                 gpu_memory_utilization: float | None = None, extra: tuple[str, ...] = ()) -> BackendCommand:
    """`vllm serve`: the base plus one LoRA adapter as a LoRA module (requests name the adapter), or a merged
    directory. A stack of several adapters must be merged first (vLLM applies one LoRA per request)."""
    if len(adapters) > 1:
        raise BackendError(f"vLLM applies one LoRA adapter per request; merge the stack of {len(adapters)} first")
    argv = ["vllm", "serve", source, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name]
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    upstream = served_name
    if adapters:
        upstream = f"{served_name}-lora"
        argv += ["--enable-lora", "--lora-modules", f"{upstream}={adapters[0]}"]
    return BackendCommand("vllm", [*argv, *extra], "/health", upstream)


def speculation_arguments(backend: str, *, prompt_lookup: int = 0, draft_model: str | None = None) -> tuple[str, ...]:
    """The backend's own speculative decoding, as arguments to its command: prompt lookup (`prompt_lookup` tokens
    proposed from the conversation) or a smaller `draft_model` that proposes, the served model verifying either
    way (greedy answers unchanged). A backend that has no such option gets a BackendError saying what does."""
    if not prompt_lookup and not draft_model:
        return ()
    if prompt_lookup and draft_model:
        raise BackendError("choose one way to speculate: --prompt-lookup or --draft-model")
    if backend == "llamacpp":
        if draft_model:
            raise BackendError("llama.cpp's Python server speculates by prompt lookup only: use --prompt-lookup K")
        return ("--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", str(prompt_lookup))
    if backend == "vllm":
        config = ({"method": "ngram", "num_speculative_tokens": prompt_lookup, "prompt_lookup_max": 3}
                  if prompt_lookup else {"method": "draft_model", "model": draft_model, "num_speculative_tokens": 4})
        return ("--speculative-config", json.dumps(config))
    raise BackendError("transformers serve has no speculative decoding (its continuous batching checks one token "
                       "per row). Speculate with vLLM on a GPU (--backend vllm), with llama.cpp on the quantize "
                       "stage's GGUF (--prompt-lookup), or in `lmforge chat --prompt-lookup K / --draft-model M`")


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the front dies, even by SIGKILL (Linux), so no model server is left behind.
    (Linux sends it when the starting *thread* ends: the front starts backends from its main thread or from
    asyncio's executor, whose threads live as long as the process.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackendProcess:
    """A started backend: its process group, its base URL and the `model` value it answers to."""

    def __init__(self, command: BackendCommand, port: int, log_path: Path):
        self.command, self.port, self.log_path = command, port, Path(log_path)
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(command.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True,  # its own group: stop() takes its children too
                                            preexec_fn=_stop_with_parent)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the health URL answers 200; raise BackendError with the log's tail if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"{self.command.backend} backend exited with code {self.process.returncode}; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.base_url + self.command.health_path, timeout=5) as r:
                    if r.status == 200:
                        return
            time.sleep(0.5)
        self.stop()
        raise BackendError(f"{self.command.backend} backend not ready after {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
                return
