"""Fetch the wheels bench/gpu_check.py needs on the lent GPU machine, check they fit, print the device command.

    python bench/fetch_gpu_wheels.py [--dest .gpu-wheels] [--python-version 3.12] [--without llamafactory]

The GPU machine has torch, transformers, peft and accelerate but no network, and no datasets, pydantic, trl,
bitsandbytes, deepspeed or liger-kernel (its package list: DEVICE_PACKAGES below, read off the machine's
image on 2026-11-17). A device call carries the working tree plus at most 8 ignored paths, 64 MiB in all, so
this downloads exactly the wheels the check imports there, for its Python (3.12, manylinux x86_64), into a
git-ignored folder; builds DeepSpeed's wheel (an sdist on PyPI) here; checks that every requirement of every
wheel is either carried or on the machine (LlamaFactory's web UI, API and hub extras are left out on
purpose: its SFT training path does not import them); checks the size against the budget; and prints the
`run` call (carry list and command line). bench/gpu_check.md says how to read what comes back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MIB = 64  # what one device call may carry: working tree + carried paths
COMMAND_LIMIT = 2000  # characters of a device call's command line

# (requirement, why the machine needs it). One version of each: two stop the whole install there.
WHEELS: dict[str, list[tuple[str, str]]] = {
    "lmforge": [
        ("peft==0.21.2", "lmforge pins peft 0.21; the machine's own version is not recorded"),
        ("datasets==5.2.0", "the training path's rows (absent there)"),
        ("dill==0.4.1", "datasets"), ("multiprocess==0.70.19", "datasets"),
        ("pydantic==2.14.4", "lmforge's configs (absent there)"), ("pydantic-core==2.50.5", "pydantic"),
        ("annotated-types==0.8.0", "pydantic"), ("typing-inspection==0.4.5", "pydantic"),
        ("orjson==3.13.0", "lmforge's JSONL reader, imported by its data modules"),
    ],
    "gpu": [
        ("bitsandbytes==0.50.2", "QLoRA's 4-bit base (43 MB: most of the budget)"),
        ("liger-kernel==0.8.5", "train.use_liger"),
        ("deepspeed==0.19.8", "ZeRO-2 (built here from its sdist)"), ("hjson==3.1.0", "deepspeed"),
    ],
    "llamafactory": [
        ("llamafactory==0.9.5", "the LoRA speed comparison"),
        ("trl==0.24.0", "llamafactory imports trl's value-head model, which trl 1.x removed; lmforge's training "
                        "path does not import trl"),
        ("omegaconf==2.3.0", "llamafactory's argument parser"), ("antlr4-python3-runtime==4.9.3", "omegaconf (built here)"),
    ],
}
# Requirements left out on purpose: not imported by `from llamafactory.train.tuner import run_exp` (checked on
# CPU 2026-12-07: it imports with none of them installed).
NOT_NEEDED = {"av", "fastapi", "fire", "gradio", "hf-transfer", "modelscope", "sse-starlette", "torchdata", "tyro",
              "uvicorn"}
# The GPU machine's Python packages (the device's KINDS.md, read 2026-11-17), with the versions recorded there.
DEVICE_PACKAGES = {name: None for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp""".split()}
DEVICE_PACKAGES.update({"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "numpy": "2.5.2",
                        "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tokenizers": "0.23.2", "triton": "3.6.0"})
BUILT_HERE = {"deepspeed", "antlr4-python3-runtime"}  # sdists only on PyPI
# pip matches a manylinux tag exactly, so every glibc level up to the machine's (2.39) is listed.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pip {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def fetch(requirement: str, dest: Path, python_version: str) -> None:
    """One wheel for the machine's Python and platform. The two sdists are built here, pure Python both (DeepSpeed's
    CUDA ops compile on first use there); DeepSpeed's setup imports torch: this environment's, no build isolation."""
    if canonicalize_name(Requirement(requirement).name) in BUILT_HERE:
        pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), requirement)
        return
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
        *platform_args, "-q", "-d", str(dest), requirement)


def sync(dest: Path, requirements: list[str], python_version: str) -> None:
    """Make `dest` hold exactly one wheel per requirement: stale ones (another version, a group left out) go."""
    wanted = {canonicalize_name(Requirement(r).name): r for r in requirements}
    have = set()
    for wheel in sorted(dest.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        req = wanted.get(name)
        if req is None or not Requirement(req).specifier.contains(version):
            print(f"removing {wheel.name} (not wanted now)")
            wheel.unlink()
        else:
            have.add(name)
    for name, requirement in wanted.items():
        if name not in have:
            print(f"fetching {requirement}", flush=True)
            fetch(requirement, dest, python_version)


def wheel_requirements(wheel: Path, python_version: str) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the machine (no extras; markers read for its Python and Linux)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    found = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                found.append(req)
    return found


def check_requirements(dest: Path, python_version: str) -> list[str]:
    """Problems: a requirement neither carried nor on the machine, a recorded machine version outside a pin,
    or two versions of one package in `dest`."""
    carried: dict[str, Version] = {}
    problems = []
    for wheel in sorted(dest.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        if name in carried:
            problems.append(f"two versions of {name} in {dest}: delete one ({carried[name]}, {version})")
        carried[name] = version
    for wheel in sorted(dest.glob("*.whl")):
        owner = parse_wheel_filename(wheel.name)[0]
        for req in wheel_requirements(wheel, python_version):
            name = canonicalize_name(req.name)
            if name in carried:
                version, where = carried[name], "carried"
            elif name in DEVICE_PACKAGES:
                version, where = DEVICE_PACKAGES[name] and Version(DEVICE_PACKAGES[name]), "on the machine"
            elif name in NOT_NEEDED:
                continue
            else:
                problems.append(f"{owner} needs {req}: neither carried nor on the machine; add it to WHEELS")
                continue
            if version and req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{owner} asks for {req}; {name} {version} is {where} (works as long as the "
                                "APIs it uses are there: gpu_check records each measurement's error)")
    return problems


def tree_bytes() -> int:
    """Bytes of what every device call sends anyway: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in set(listed) if p and (ROOT / p.decode()).is_file())


def device_call(dest: Path) -> dict:
    """The `run` tool's arguments: the wheels installed into /tmp/site first, then the check."""
    rel = dest.resolve().relative_to(ROOT)
    command = (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               f"--target /tmp/site {rel}/*.whl && export PYTHONPATH=/tmp/site || exit 1; "
               "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; set -o pipefail; "
               "PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/results_gpu_check.json 2>&1 "
               "| tee $OUT/gpu_check.log")
    if len(command) > COMMAND_LIMIT:
        raise SystemExit(f"the device command is {len(command)} characters, over the {COMMAND_LIMIT} a call takes")
    return {"carry": [str(rel)], "timeout_s": 540, "command": command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels", help="git-ignored folder for the wheels")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12)")
    parser.add_argument("--without", default="", help=f"comma-separated groups to leave out: {', '.join(WHEELS)}")
    args = parser.parse_args()
    skipped = set(filter(None, args.without.split(",")))
    if skipped - set(WHEELS):
        parser.error(f"unknown group(s) {', '.join(sorted(skipped - set(WHEELS)))}; known: {', '.join(WHEELS)}")
    args.dest.mkdir(parents=True, exist_ok=True)
    sync(args.dest, [r for group, wheels in WHEELS.items() if group not in skipped for r, _why in wheels],
         args.python_version)
    problems = check_requirements(args.dest, args.python_version)
    wheels_b, tree_b = sum(w.stat().st_size for w in args.dest.glob("*.whl")), tree_bytes()
    total_mib = (wheels_b + tree_b) / 2**20
    print(f"wheels {wheels_b / 2**20:.1f} MiB + working tree {tree_b / 2**20:.1f} MiB = {total_mib:.1f} MiB "
          f"(budget {BUDGET_MIB} MiB)")
    for problem in problems:
        print(f"warning: {problem}")
    if total_mib > BUDGET_MIB:
        raise SystemExit(f"over the {BUDGET_MIB} MiB a device call carries: leave a group out (--without "
                         "llamafactory saves ~2 MiB, bitsandbytes is 43) or shrink untracked files in the tree")
    if not args.dest.resolve().is_relative_to(ROOT):
        print(f"{args.dest} is outside the repository, so no device call can carry it (fine for a local check)")
        return
    print("device call (the run tool's arguments):")
    print(json.dumps(device_call(args.dest), indent=1))


if __name__ == "__main__":
    main()
