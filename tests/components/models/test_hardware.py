"""Device and precision: decided without torch where no GPU can be seen, with torch's answer where one can."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.models import loading
from components.models.loading import Hardware, select_hardware

ROOT = Path(__file__).resolve().parents[3]


def test_precision_names_the_torch_dtype():
    import torch

    assert Hardware("cpu", "fp32").dtype is torch.float32
    assert Hardware("cuda", "bf16").dtype is torch.bfloat16
    assert Hardware("cuda", "fp16").dtype is torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        Hardware("cpu", "int4")


def test_auto_on_a_machine_without_gpu_device_files_is_cpu_fp32_without_importing_torch():
    if sys.platform != "linux" or loading.gpu_device_nodes():
        pytest.skip("needs a Linux machine without GPU device files")
    probe = ("import json, sys\nfrom components.models.loading import select_hardware\n"
             "hw = select_hardware('auto', 'auto')\n"
             "print(json.dumps([hw.device, hw.precision, 'torch' in sys.modules]))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["cpu", "fp32", False]


def test_with_gpu_device_files_torch_decides(monkeypatch):
    import torch

    monkeypatch.setattr(loading, "gpu_device_nodes", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert select_hardware("auto", "auto") == Hardware("cuda", "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_hardware("auto", "auto") == Hardware("cpu", "fp32")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        select_hardware("cuda", "auto")
