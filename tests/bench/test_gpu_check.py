"""bench/gpu_check.py cannot rot before a GPU comes: its dry run trains the tiny shapes on CPU through every
measurement it can run here, and the JSON, the goals, RESULTS.md's section and the wheel helper are checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import fetch_gpu_wheels  # noqa: E402
import gpu_check  # noqa: E402

TRAINING = ("lora_lmforge", "qlora_8b", "sdpa_flash", "sdpa_math")  # lmforge's own runs, all CPU-capable


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """One dry run of every measurement (the ZeRO-2 one starts the real `deepspeed` launcher: most of the time)."""
    out = tmp_path_factory.mktemp("gpu-check") / "dry.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_measures_every_training_path_with_real_figures(dry_run):
    m = dry_run["measurements"]
    assert dry_run["dry_run"] is True and list(m) == list(gpu_check.MEASUREMENTS)
    failed = {k: r.get("error") for k, r in m.items() if r["status"] not in ("ok", "skipped")}
    assert not failed, failed
    for name in TRAINING:
        f = m[name]["figures"]
        assert m[name]["status"] == "ok", name
        assert _real(f["tokens_per_s"]) and f["tokens_per_s"] > 0 and _real(f["s_per_step"]), (name, f)
        assert _real(f["peak_memory_gib"]) and f["peak_memory_gib"] > 0, (name, f)
        assert _real(f["loss_first"]) and _real(f["loss_last"]) and f["precision"] == "fp32", (name, f)
        assert f["timed_steps"] == dry_run["settings"]["steps" if name != "qlora_8b" else "qlora_steps"]
        assert sum(f["weights_gib_by_dtype"].values()) > 0, (name, f)
    assert "uint8" in m["qlora_8b"]["figures"]["weights_gib_by_dtype"]  # the 4-bit weights, packed
    # every step trains batch x seq_len tokens: lmforge's own count agrees with the clock's
    s = dry_run["settings"]
    steps = s["warmup"] + s["steps"]
    assert m["lora_lmforge"]["figures"]["tokens_counted_by_lmforge"] == s["batch"] * s["seq_len"] * steps
    assert m["hardware"]["figures"]["precision"] == "fp32" and dry_run["device"]["device"] == "cpu"
    assert m["liger"]["status"] == "skipped" and "CUDA" in m["liger"]["reason"]


def test_dry_run_zero2_and_llamafactory_are_measured_or_say_why(dry_run):
    zero2 = dry_run["measurements"]["zero2"]
    assert zero2["status"] == "ok", zero2
    assert zero2["figures"]["finite_loss"] is True and _real(zero2["figures"]["tokens_per_s_with_warmup"])
    lf = dry_run["measurements"]["lora_llamafactory"]
    if lf["status"] == "ok":  # where llamafactory is installed (not in CI: its pins clash with lmforge's)
        assert _real(lf["figures"]["tokens_per_s"])
    else:
        assert lf["status"] == "skipped" and "fetch_gpu_wheels" in lf["reason"]


def test_dry_run_records_versions_and_leaves_gpu_goals_unjudged(dry_run, tmp_path):
    assert dry_run["versions"]["torch"] and dry_run["versions"]["transformers"]
    goals = {g["name"].split(":")[0].split(",")[0]: g for g in dry_run["goals"]}
    assert goals["precision chosen from the hardware"]["pass"] is True
    assert goals["DeepSpeed ZeRO-2 on one device trains (finite loss)"]["pass"] is True
    qlora = goals["QLoRA Llama-3.1-8B"]
    assert qlora["pass"] is None and _real(qlora["value"]) and "dry run" in qlora["note"]
    # the dry run never stands in for a GPU run in RESULTS.md
    path = tmp_path / "results_gpu_check.json"
    path.write_text(json.dumps(dry_run))
    section = "\n".join(gpu_check.markdown_section(path))
    assert "Not yet run on a GPU" in section and "dry run" in section


def test_child_process_mode_runs_and_reports_each_measurement(tmp_path):
    """The GPU run's mode: each measurement in a process of its own, its result read back."""
    out = tmp_path / "isolated.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--isolate", "--only", "hardware,liger",
                           "--out", str(out), "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(out.read_text())["measurements"]
    assert m["hardware"]["status"] == "ok" and m["hardware"]["figures"]["device"] == "cpu"
    assert m["liger"]["status"] == "skipped"
    assert (tmp_path / "work" / "hardware.log").is_file()


def _gpu_result(peak: float, ours: float, theirs: float) -> dict:
    fig = lambda **f: {"status": "ok", "seconds": 1.0, "figures": f}  # noqa: E731
    return {"dry_run": False, "created_at": "2026-12-07T12:00:00", "versions": {"torch": "2.11.0"},
            "device": {"device_name": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "cuda": "13.0"},
            "settings": {**gpu_check.PLANS["gpu"], "big": None, "small": None},
            "measurements": {"hardware": fig(device="cuda", precision="bf16", bf16_supported=True),
                             "qlora_8b": fig(peak_memory_gib=peak, tokens_per_s=900.0,
                                             weights_gib_by_dtype={"uint8": 3.4, "float32": 3.9}),
                             "lora_lmforge": fig(tokens_per_s=ours), "lora_llamafactory": fig(tokens_per_s=theirs),
                             "zero2": fig(finite_loss=True),
                             "liger": {"status": "failed", "seconds": 2.0, "error": "RuntimeError: boom"}}}


def test_goals_are_judged_on_a_gpu_run_and_rendered_with_the_device(tmp_path):
    good = _gpu_result(peak=7.1, ours=30000.0, theirs=20000.0)
    judged = {g["name"]: g for g in gpu_check.goals(good)}
    speed = judged["LoRA tokens/s, lmforge / LlamaFactory 0.9.5 (Qwen2.5-0.5B shape)"]
    assert speed["value"] == pytest.approx(1.5) and speed["pass"] is True
    assert judged["QLoRA Llama-3.1-8B, batch 2 x 2048: peak GPU memory (GiB)"]["pass"] is True
    bad = {g["name"]: g["pass"] for g in gpu_check.goals(_gpu_result(peak=7.5, ours=21000.0, theirs=20000.0))}
    assert bad["QLoRA Llama-3.1-8B, batch 2 x 2048: peak GPU memory (GiB)"] is False
    assert bad["LoRA tokens/s, lmforge / LlamaFactory 0.9.5 (Qwen2.5-0.5B shape)"] is False
    good["goals"] = gpu_check.goals(good)
    path = tmp_path / "results_gpu_check.json"
    path.write_text(json.dumps(good))
    section = "\n".join(gpu_check.markdown_section(path))
    assert "NVIDIA H100 80GB HBM3" in section and "Not yet run" not in section
    assert "| liger | failed" in section and "boom" in section and "float32 3.90, uint8 3.40" in section
    assert "Not yet run on a GPU" in "\n".join(gpu_check.markdown_section(tmp_path / "absent.json"))


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheel_check_names_what_the_machine_would_miss(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", ["torch>=2.0", "beta", "gradio; extra == 'web'", "winonly; sys_platform == 'win32'"])
    _wheel(tmp_path, "beta", "2.0", ["transformers<=5.6.0", "missingpkg>=1"])
    problems = fetch_gpu_wheels.check_requirements(tmp_path, "3.12")
    assert any("missingpkg" in p and "neither carried nor on the machine" in p for p in problems)
    assert any("transformers<=5.6.0" in p and "5.17.0" in p for p in problems)  # the machine's recorded version
    assert not any(word in p for p in problems for word in ("gradio", "winonly", "torch>=2.0", "needs beta"))
    _wheel(tmp_path, "beta", "3.0", [])
    assert any("two versions of beta" in p for p in fetch_gpu_wheels.check_requirements(tmp_path, "3.12"))


def test_device_call_fits_the_run_tool(tmp_path):
    wheels = fetch_gpu_wheels.ROOT / ".gpu-wheels"
    call = fetch_gpu_wheels.device_call(wheels)
    assert call["carry"] == [".gpu-wheels"] and len(call["command"]) <= 2000 and call["timeout_s"] <= 600
    assert "bench/gpu_check.py --out $OUT/results_gpu_check.json" in call["command"]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu-wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, ".gpu-wheels must be git-ignored: it is carried, never committed"


def test_compat_hands_activation_checkpointing_to_an_older_transformers():
    """The GPU machine's transformers (5.17) names it gradient_checkpointing; lmforge's lora.py passes the newer
    name. Where the new name exists nothing is adapted."""
    import dataclasses

    import gpu_measurements

    assert gpu_measurements.transformers_compat() == []  # this environment's transformers has both names

    @dataclasses.dataclass
    class OlderTrainingArguments:  # the two fields as transformers 5.17 has them
        output_dir: str = "out"
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    notes = gpu_measurements.transformers_compat(OlderTrainingArguments)
    assert len(notes) == 1 and "gradient_checkpointing" in notes[0]
    args = OlderTrainingArguments(output_dir="x", activation_checkpointing=True,
                                  activation_checkpointing_kwargs={"use_reentrant": False})
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert OlderTrainingArguments(output_dir="x").gradient_checkpointing is False
