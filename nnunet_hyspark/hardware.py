"""What this machine's CPU can do fast, read once from ``/proc/cpuinfo``, and the precision that follows.

bf16 autocast pays on a CPU only with AMX tile units (``amx_bf16``, Intel Xeon Sapphire Rapids and
later): measured about 2x faster there. CPUs with only ``avx512_bf16`` (and CPUs without either) ran
HySparK's step slower in bf16 than in fp32, so ``--precision auto`` picks bf16 on CUDA and on AMX
CPUs only. Used by ``hyspark_benchmark speed`` (its header) and ``hyspark_pretrain --precision auto``.

oneDNN (torch's CPU convolutions and bf16 matrix products) can be told to use no more than a given
instruction set, ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX512_CORE_BF16``: no AMX; ``AVX2``). Then the kernels
are those of a CPU without the capped features, so what counts is the cap, not the flags: an AMX Xeon
capped at ``AVX512_CORE_BF16`` ran the bf16 k3 convolution 1.3x slower than fp32 (48 channels at 96^3,
forward + backward, 2 threads), where uncapped it ran 2x faster. This also makes an AMX machine a
stand-in for a CPU with only AVX-512 bf16.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Mapping

CPUINFO = "/proc/cpuinfo"
#: oneDNN's instruction-set cap (``DNNL_MAX_CPU_ISA`` is its older name); unset, ``ALL`` or ``DEFAULT``: no cap
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_NO_CAP = ("", "ALL", "DEFAULT")


def onednn_isa_cap(environ: Mapping[str, str] | None = None) -> str | None:
    """The instruction set oneDNN is capped at (upper case), or None where it may use everything."""
    environ = os.environ if environ is None else environ
    for name in ISA_CAP_VARIABLES:
        value = environ.get(name, "").strip().upper()
        if value not in _NO_CAP:
            return value
    return None


def _cap_allows(cap: str | None, feature: str) -> bool:
    """Whether oneDNN capped at ``cap`` may use ``feature`` ('amx' or 'avx512_bf16'). oneDNN's ISA names
    above AVX512_CORE_BF16 are AVX10_* and AVX512_CORE_* with AMX or FP16 in them."""
    if cap is None:
        return True
    if feature == "amx":
        return "AMX" in cap
    return "AMX" in cap or cap.startswith("AVX10") or cap in ("AVX512_CORE_BF16", "AVX512_CORE_FP16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, logical cores, its bf16 matrix features and oneDNN's instruction-set cap."""

    model: str
    cores: int
    amx_bf16: bool
    avx512_bf16: bool
    isa_cap: str | None = None

    @property
    def amx_in_use(self) -> bool:
        """AMX is on the CPU and oneDNN may use it."""
        return self.amx_bf16 and _cap_allows(self.isa_cap, "amx")

    @property
    def avx512_bf16_in_use(self) -> bool:
        """AVX-512 bf16 is on the CPU and oneDNN may use it."""
        return self.avx512_bf16 and _cap_allows(self.isa_cap, "avx512_bf16")

    def describe(self) -> str:
        """e.g. 'AMD EPYC, 2 cores, AMX bf16: no, AVX-512 bf16: no'; with a cap that hides a feature, e.g.
        'AMX bf16: yes, not used (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)'."""
        def feature(present: bool, used: bool) -> str:
            if not present:
                return "no"
            return "yes" if used else f"yes, not used (ONEDNN_MAX_CPU_ISA={self.isa_cap})"

        text = (f"{self.model}, {self.cores} cores, AMX bf16: {feature(self.amx_bf16, self.amx_in_use)}, "
                f"AVX-512 bf16: {feature(self.avx512_bf16, self.avx512_bf16_in_use)}")
        return text + (f", oneDNN capped at {self.isa_cap}" if self.isa_cap else "")


def parse_cpuinfo(text: str, cores: int | None = None, isa_cap: str | None = None) -> CpuInfo:
    """The :class:`CpuInfo` of a ``/proc/cpuinfo`` text (its first processor's model and flags) under
    oneDNN's instruction-set cap ``isa_cap`` (None: no cap)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or platform.machine(), cores or os.cpu_count() or 1,
                   "amx_bf16" in flags, "avx512_bf16" in flags, isa_cap)


def cpu_info(path: str = CPUINFO) -> CpuInfo:
    """This machine's CPU (model name and flags unknown, i.e. False, where ``path`` cannot be read), under
    this process's oneDNN cap (:func:`onednn_isa_cap`)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, isa_cap=onednn_isa_cap())


def auto_precision(device_type: str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(precision, why) for ``--precision auto`` on a device of type ``device_type`` ('cuda', 'cpu', ...):
    bf16 on CUDA and on CPUs with AMX that oneDNN may use, fp32 elsewhere."""
    if device_type == "cuda":
        return "bf16", "CUDA device"
    if device_type != "cpu":
        return "fp32", f"{device_type} device"
    cpu = cpu or cpu_info()
    if cpu.amx_in_use:
        return "bf16", f"CPU with AMX ({cpu.model})"
    if cpu.amx_bf16:
        return "fp32", f"CPU without AMX in use ({cpu.model}: oneDNN capped at {cpu.isa_cap})"
    why = "only AVX-512 bf16, which ran slower in bf16" if cpu.avx512_bf16 else "no bf16 matrix units"
    return "fp32", f"CPU without AMX ({cpu.model}: {why})"
