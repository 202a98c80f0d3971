"""The hardware a plan is for: GPUs through NVML, or a description of another server ('8x80')."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] = (8, 0)

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)  # Ampere and later


@dataclass(frozen=True)
class Inventory:
    """What training can use on one node: its GPUs (none: CPU only) and its RAM; `nodes` alike nodes."""

    gpus: tuple[Gpu, ...] = ()
    host_memory_bytes: int = 0
    nodes: int = 1

    @property
    def devices(self) -> int:
        return max(len(self.gpus), 1) * self.nodes

    @property
    def device_memory_bytes(self) -> int:
        """Memory of the smallest device: every rank holds the same shard."""
        return min(g.memory_bytes for g in self.gpus) if self.gpus else self.host_memory_bytes

    def describe(self) -> str:
        if not self.gpus:
            return f"CPU only, {self.host_memory_bytes / GiB:.0f} GiB RAM"
        names = sorted({g.name for g in self.gpus})
        per_node = f"{len(self.gpus)}x {'/'.join(names)} ({self.device_memory_bytes / GiB:.0f} GiB)"
        return per_node + (f" on each of {self.nodes} nodes" if self.nodes > 1 else "") + \
            f", {self.host_memory_bytes / GiB:.0f} GiB RAM"


def host_memory_bytes() -> int:
    """Total RAM: psutil when installed, else the POSIX page count."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_inventory() -> Inventory:
    """GPUs through NVML (nvidia-ml-py); no driver, library or GPU: CPU only."""
    gpus: list[Gpu] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                gpus.append(Gpu(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                ))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError, NVMLError (no driver / no GPU): plan for the CPU
        log.debug("no GPU through NVML (%s); planning for the CPU", exc)
    return Inventory(gpus=tuple(gpus), host_memory_bytes=host_memory_bytes())


def parse_gpus(spec: str, host_memory_gib: float = 256) -> Inventory:
    """An inventory from text, for planning another server: '8x80' (8 GPUs of 80 GiB), '1x24',
    '2x8x80' (2 nodes of 8), 'cpu'."""
    if spec.strip().lower() == "cpu":
        return Inventory(host_memory_bytes=int(host_memory_gib * GiB))
    parts = spec.lower().replace("gib", "").replace("gb", "").split("x")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--gpus {spec!r}: write COUNTxGIB (8x80), NODESxCOUNTxGIB (2x8x80) or cpu") from None
    if len(numbers) == 2:
        numbers.insert(0, 1)
    if len(numbers) != 3 or min(numbers) <= 0:
        raise ValueError(f"--gpus {spec!r}: write COUNTxGIB (8x80), NODESxCOUNTxGIB (2x8x80) or cpu")
    nodes, count, gib = int(numbers[0]), int(numbers[1]), numbers[2]
    gpu = Gpu(name="GPU", memory_bytes=int(gib * GiB))
    return Inventory(gpus=(gpu,) * count, host_memory_bytes=int(host_memory_gib * GiB), nodes=nodes)
