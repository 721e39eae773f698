"""What this machine's CPU can do fast, read once from ``/proc/cpuinfo``, and the precision that follows.

bf16 autocast pays on a CPU only with AMX tile units (``amx_bf16``, Intel Xeon Sapphire Rapids and
later): measured about 2x faster there. CPUs with only ``avx512_bf16`` (and CPUs without either) ran
HySparK's step slower in bf16 than in fp32, so ``--precision auto`` picks bf16 on CUDA and on AMX
CPUs only. Used by ``hyspark_benchmark speed`` (its header) and ``hyspark_pretrain --precision auto``.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, logical cores and its bf16 matrix features."""

    model: str
    cores: int
    amx_bf16: bool
    avx512_bf16: bool

    def describe(self) -> str:
        """e.g. 'AMD EPYC, 2 cores, AMX bf16: no, AVX-512 bf16: no'."""
        yes = {True: "yes", False: "no"}
        return (f"{self.model}, {self.cores} cores, AMX bf16: {yes[self.amx_bf16]}, "
                f"AVX-512 bf16: {yes[self.avx512_bf16]}")


def parse_cpuinfo(text: str, cores: int | None = None) -> CpuInfo:
    """The :class:`CpuInfo` of a ``/proc/cpuinfo`` text (its first processor's model and flags)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or platform.machine(), cores or os.cpu_count() or 1,
                   "amx_bf16" in flags, "avx512_bf16" in flags)


def cpu_info(path: str = CPUINFO) -> CpuInfo:
    """This machine's CPU (model name and flags unknown, i.e. False, where ``path`` cannot be read)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def auto_precision(device_type: str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(precision, why) for ``--precision auto`` on a device of type ``device_type`` ('cuda', 'cpu', ...):
    bf16 on CUDA and on CPUs with AMX, fp32 elsewhere."""
    if device_type == "cuda":
        return "bf16", "CUDA device"
    if device_type != "cpu":
        return "fp32", f"{device_type} device"
    cpu = cpu or cpu_info()
    if cpu.amx_bf16:
        return "bf16", f"CPU with AMX ({cpu.model})"
    why = "only AVX-512 bf16, which ran slower in bf16" if cpu.avx512_bf16 else "no bf16 matrix units"
    return "fp32", f"CPU without AMX ({cpu.model}: {why})"
