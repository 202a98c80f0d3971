"""`lmforge plan`: model shapes, the memory estimate against measured peaks, plans for fixed GPU
inventories (their configs load), the shipped GPU presets agree with the planner, and the
natural-language mode against a fake OpenAI-compatible server gives what the questionnaire gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.config import load_config
from components.planner import (
    GiB,
    Gpu,
    Inventory,
    ModelShape,
    PlanRequest,
    ask_llm,
    detect_inventory,
    estimate_memory,
    make_plan,
    model_shape,
    parse_gpus,
    plan_config,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[2]
QWEN7B = "Qwen/Qwen2.5-7B-Instruct"
DEMO = "embedded:smollm2-135m-instruct"
ONE_24 = Inventory(gpus=(Gpu("RTX 4090", 24 * GiB, (8, 9)),), host_memory_bytes=64 * GiB)
EIGHT_80 = Inventory(gpus=(Gpu("H100", 80 * GiB, (9, 0)),) * 8, host_memory_bytes=1024 * GiB)
CPU_ONLY = Inventory(host_memory_bytes=24 * GiB)


def test_shape_from_a_local_config_counts_the_model_exactly(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape = model_shape(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(4) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


@pytest.mark.parametrize(("model", "billions"), [
    (QWEN7B, 7.62), ("meta-llama/Llama-3.1-8B", 8.03), ("mistralai/Mistral-7B-Instruct-v0.3", 7.25),
    ("Qwen/Qwen2.5-0.5B", 0.494), ("embedded:smollm2-135m-instruct", 0.1345), ("HuggingFaceTB/SmolLM2-1.7B", 1.71),
])
def test_built_in_table_gives_published_sizes(model, billions):
    assert model_shape(model).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_unknown_hub_model_names_what_to_do():
    with pytest.raises(ValueError, match="local model directory"):
        model_shape("someone/unknown-13b")


def test_full_finetuning_costs_16_bytes_per_parameter_and_zero_shards_it():
    shape = model_shape(QWEN7B)
    one = estimate_memory(shape, "full", seq_len=1, micro_batch=1, precision="bf16")
    assert (one.weights + one.gradients + one.optimizer) / shape.params == 16
    z2 = estimate_memory(shape, "full", seq_len=1, micro_batch=1, zero_stage=2, devices=8)
    z3 = estimate_memory(shape, "full", seq_len=1, micro_batch=1, zero_stage=3, devices=8)
    assert z2.weights == one.weights and z2.optimizer == one.optimizer / 8
    assert z3.weights == one.weights / 8
    off = estimate_memory(shape, "full", seq_len=1, micro_batch=1, zero_stage=3, devices=8, offload=True)
    assert off.weights == off.optimizer == 0 and off.offloaded == z3.weights + z3.optimizer
    qlora = estimate_memory(shape, "qlora", seq_len=1, micro_batch=1)
    lora = estimate_memory(shape, "lora", seq_len=1, micro_batch=1)
    assert qlora.weights < 0.4 * lora.weights  # 4-bit linear weights, 16-bit embeddings
    ckpt = estimate_memory(shape, "lora", seq_len=2048, micro_batch=4, gradient_checkpointing=True)
    assert ckpt.activations < estimate_memory(shape, "lora", seq_len=2048, micro_batch=4).activations / 3


# A model big enough that tensors, not Python, dominate the process's memory.
_MEASURE = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

method, ckpt = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
ids = torch.randint(0, 2048, (8, 512))
base = status_bytes("VmRSS")
model = LlamaForCausalLM(cfg)
if method == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
for _ in range(2):  # the second step runs with the optimizer states allocated
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
# VmHWM, not getrusage's ru_maxrss: that one starts at the parent's peak (exec keeps it), pytest's after other tests.
print(json.dumps({"peak_bytes": status_bytes("VmHWM") - base}))
"""


@pytest.mark.parametrize(("method", "checkpointing"), [("full", False), ("lora", True)])
def test_estimate_is_within_30_percent_of_a_measured_cpu_step(method, checkpointing):
    """Peak RSS of fresh processes doing two fp32 training steps, against the estimate. glibc is told to
    mmap every allocation over 64 KiB, so freed tensors go back to the OS and RSS follows live memory."""
    # A clean environment: what the child allocates must not depend on variables earlier tests leave behind.
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "HF_HUB_OFFLINE", "VIRTUAL_ENV")
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, method, "1" if checkpointing else "0"], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    shape = ModelShape(name="measured", layers=4, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=2048,
                       tied_embeddings=False)
    predicted = estimate_memory(shape, method, seq_len=512, micro_batch=8, precision="fp32",
                                gradient_checkpointing=checkpointing, lora_r=16).total
    assert 0.7 <= measured / predicted <= 1.3, (measured / 2**20, predicted / 2**20)


@pytest.mark.parametrize(("model", "inventory", "expect"), [
    (QWEN7B, ONE_24, dict(method="qlora", zero_stage=0, offload=False, precision="bf16", device="cuda")),
    (QWEN7B, EIGHT_80, dict(method="full", zero_stage=2, offload=False, precision="bf16", device="cuda")),
    (DEMO, CPU_ONLY, dict(method="lora", zero_stage=0, offload=False, precision="fp32", device="cpu")),
], ids=["7b-1x24GiB", "7b-8x80GiB", "135m-cpu"])
def test_plans_for_fixed_inventories_are_sensible_and_their_configs_load(model, inventory, expect, tmp_path):
    plan = make_plan(PlanRequest(model=model, context_length=2048, tokens_per_step=65536), inventory)
    assert (plan.method, plan.zero_stage, plan.offload, plan.precision) == (
        expect["method"], expect["zero_stage"], expect["offload"], expect["precision"])
    assert plan.estimate.total <= plan.budget_bytes
    assert plan.tokens_per_step >= 65536 and plan.micro_batch >= 1
    config_path, readme = write_plan(plan, tmp_path)
    assert config_path.read_text().startswith(f"# lmforge run {config_path}")
    cfg = load_config(config_path)
    for stage in (cfg.cpt, cfg.sft):
        assert (stage.batch_size, stage.grad_accum) == (plan.micro_batch, plan.grad_accum)
        assert (stage.deepspeed.stage, stage.deepspeed.offload) == (plan.zero_stage, plan.offload)
        assert stage.gradient_checkpointing == plan.gradient_checkpointing
        if "finetuning" in type(stage).model_fields:
            assert stage.finetuning == plan.method
    assert cfg.compute.device == expect["device"] and cfg.compute.precision == expect["precision"]
    assert cfg.tokenize.cutoff_len == 2048 and cfg.model.base == model
    assert f"lmforge run {config_path}" in readme.read_text()


def test_small_model_on_one_gpu_trains_fully_and_cpu_gets_lora():
    small = PlanRequest(model="Qwen/Qwen2.5-0.5B-Instruct")
    assert make_plan(small, ONE_24).method == "full"
    assert make_plan(PlanRequest(), CPU_ONLY).method == "lora"  # CPUs are compute-bound
    # Multi-node: ZeRO still shards over every device, and tokens per step count them all.
    two_nodes = parse_gpus("2x8x80")
    plan = make_plan(PlanRequest(model=QWEN7B), two_nodes)
    assert two_nodes.devices == 16 and plan.zero_stage >= 2 and plan.tokens_per_step >= 65536


def test_a_model_that_cannot_fit_says_what_to_change():
    with pytest.raises(ValueError, match="CPU only, 24 GiB RAM .* shorter context"):
        make_plan(PlanRequest(model=QWEN7B), CPU_ONLY)
    with pytest.raises(ValueError, match="shorter context, more or larger GPUs"):
        make_plan(PlanRequest(model=QWEN7B, method="full"), Inventory(gpus=(Gpu("small", 8 * GiB),),
                                                                      host_memory_bytes=16 * GiB))


@pytest.mark.parametrize(("preset", "gpus", "asked"), [
    ("qwen2.5-7b-qlora.yaml", "1x24", {}),
    ("qwen2.5-7b-lora.yaml", "4x40", {}),
    ("qwen2.5-7b-full-zero3.yaml", "4x24", {"method": "full"}),
    ("gpu-qwen2.5-0.5b-full.yaml", "1x16", {}),
    ("mistral-7b-long-context.yaml", "1x80", {"tokens_per_step": 524288}),
])
def test_gpu_presets_are_what_the_planner_recommends(preset, gpus, asked):
    """The preset's batch shape, method and ZeRO settings are the plan its comment quotes (`lmforge plan ...`)."""
    cfg = load_config(ROOT / "configs" / preset)
    plan = make_plan(PlanRequest(model=cfg.model.base, context_length=cfg.tokenize.cutoff_len,
                                 max_steps=cfg.sft.max_steps, **asked), parse_gpus(gpus))
    planned = plan_config(plan)["sft"]
    for key in ("batch_size", "grad_accum", "gradient_checkpointing", "learning_rate", "max_steps"):
        assert getattr(cfg.sft, key) == planned[key], key
    assert cfg.sft.deepspeed.model_dump() == planned["deepspeed"]
    if "finetuning" in planned:
        assert cfg.sft.finetuning == planned["finetuning"]
    comment = " ".join(line.lstrip("# ") for line in (ROOT / "configs" / preset).read_text().splitlines()
                       if line.startswith("#"))
    assert f"--gpus {gpus}" in comment
    for name, value in asked.items():
        assert f"--{name.replace('_', '-')} {value}" in comment


def test_gpus_are_read_through_nvml_and_missing_nvml_means_cpu(monkeypatch):
    class FakeNvml(SimpleNamespace):
        pass

    fake = FakeNvml(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA A100-SXM4-80GB",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * GiB),
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 0),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inv = detect_inventory()
    assert [(g.name, g.memory_bytes) for g in inv.gpus] == [("NVIDIA A100-SXM4-80GB", 80 * GiB)] * 2
    assert inv.host_memory_bytes > 0

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(nvmlInit=no_driver))
    assert detect_inventory().gpus == ()


def test_parse_gpus_rejects_nonsense():
    assert parse_gpus("8x80").devices == 8 and parse_gpus("cpu").gpus == ()
    with pytest.raises(ValueError, match="COUNTxGIB"):
        parse_gpus("lots")


# --- natural-language mode ---

CANNED = {"model": QWEN7B, "context_length": 4096, "tokens_per_step": 131072, "method": "auto", "max_steps": 500}


@pytest.fixture
def fake_openai():
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers CANNED and records requests."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(CANNED)}}]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()


def test_ask_fills_the_request_through_a_json_schema_answer(fake_openai, monkeypatch, caplog):
    url, seen = fake_openai
    monkeypatch.setenv("LMFORGE_LLM_API_KEY", "sk-test-secret")
    caplog.set_level("DEBUG")
    request = ask_llm("fine-tune qwen 7b instruct on 4k-token documents, 500 steps, 128k tokens a step", url, "m")
    assert request == PlanRequest(**CANNED)
    (call,) = seen
    assert call["path"] == "/v1/chat/completions" and call["auth"] == "Bearer sk-test-secret"
    schema = call["body"]["response_format"]["json_schema"]["schema"]
    assert set(schema["properties"]) == set(PlanRequest.model_fields)
    assert "sk-test-secret" not in caplog.text


def test_questionnaire_gives_the_same_plan_as_the_endpoint(fake_openai, tmp_path):
    """`plan --ask` with an endpoint and `plan --ask` answered at the prompts write the same config."""
    from typer.testing import CliRunner

    from flows.cli import app

    url, _ = fake_openai
    runner = CliRunner()
    common = ["plan", "--ask", "qwen 7b, 4k context", "--gpus", "1x24"]
    by_llm = runner.invoke(app, [*common, "--llm-base-url", url, "--out", str(tmp_path / "llm")],
                           env={"LMFORGE_LLM_BASE_URL": ""})
    assert by_llm.exit_code == 0, by_llm.output
    answers = "\n".join(str(CANNED[k]) for k in PlanRequest.model_fields) + "\n"
    by_hand = runner.invoke(app, [*common, "--out", str(tmp_path / "hand")], input=answers,
                            env={"LMFORGE_LLM_BASE_URL": ""})
    assert by_hand.exit_code == 0, by_hand.output

    def body(d):  # the first line names the file's own path
        return (tmp_path / d / "plan.yaml").read_text().split("\n", 1)[1]

    assert body("llm") == body("hand")
    assert load_config(tmp_path / "hand" / "plan.yaml").tokenize.cutoff_len == 4096
