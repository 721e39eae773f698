"""What this machine's CPU can do fast, read once from ``/proc/cpuinfo``, and the precision that follows.

bf16 autocast pays on CPUs with AMX tile units (``amx_bf16``, Intel Xeon Sapphire Rapids and later):
HySparK's step measured about 2x faster there. On CPUs with ``avx512_bf16`` but no AMX it depends on the
CPU: an Intel Xeon ran the step slower in bf16 than in fp32, a 2-core AMD EPYC (Zen 4) 1.8x faster. So
``--precision auto`` picks bf16 on CUDA and on AMX CPUs, fp32 on CPUs without bf16 units, and on the
CPUs in between times a k3 convolution both ways (:func:`time_bf16_against_fp32`, about a second) and
takes bf16 only where it is clearly faster. Used by ``hyspark_benchmark speed`` (its header) and
``hyspark_pretrain --precision auto``.

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
from typing import Callable, Mapping

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


#: bf16 must be this much faster than fp32 in :func:`time_bf16_against_fp32` for ``--precision auto`` to
#: take it: below it the measurement is within this machine's noise and fp32 is the exact choice
BF16_MIN_SPEEDUP = 1.15


def time_bf16_against_fp32(channels: int = 48, size: int = 32, repeats: int = 5) -> tuple[float, float]:
    """The fastest of ``repeats`` timings of one 3x3x3 convolution step (forward and backward, channels-last,
    batch 1, ``channels`` in and out at ``size``^3: a light-decoder layer scaled down) in fp32 and under bf16
    autocast, on this process's CPU threads. The two alternate, and the fastest of each is taken: another
    process's burst of work slows some calls, and the fastest is the one it spared. The first call of each
    is a warm-up (oneDNN builds its kernels then)."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)  # its own generator: a seeded run's random stream stays untouched
    cl = torch.channels_last_3d
    x = torch.randn(1, channels, size, size, size, generator=gen).contiguous(memory_format=cl).requires_grad_()
    w = (torch.randn(channels, channels, 3, 3, 3, generator=gen) * 0.05).contiguous(memory_format=cl).requires_grad_()

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = torch.nn.functional.conv3d(x, w, padding=1)
        y.float().sum().backward()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for bf16 in (False, True):
            t = step(bf16)
            if i:
                times[bf16].append(t)
    return min(times[False]), min(times[True])


def auto_precision(device_type: str, cpu: CpuInfo | None = None,
                   measure: Callable[[], tuple[float, float]] = time_bf16_against_fp32) -> tuple[str, str]:
    """(precision, why) for ``--precision auto`` on a device of type ``device_type`` ('cuda', 'cpu', ...):
    bf16 on CUDA and on CPUs with AMX that oneDNN may use; fp32 on CPUs without bf16 units in use; on
    CPUs with AVX-512 bf16 but no AMX, bf16 where ``measure()`` (fp32 s, bf16 s) finds it at least
    :data:`BF16_MIN_SPEEDUP` times faster."""
    if device_type == "cuda":
        return "bf16", "CUDA device"
    if device_type != "cpu":
        return "fp32", f"{device_type} device"
    cpu = cpu or cpu_info()
    if cpu.amx_in_use:
        return "bf16", f"CPU with AMX ({cpu.model})"
    if not cpu.avx512_bf16_in_use:
        if cpu.amx_bf16 or cpu.avx512_bf16:
            return "fp32", f"CPU without AMX in use ({cpu.model}: oneDNN capped at {cpu.isa_cap})"
        return "fp32", f"CPU without AMX ({cpu.model}: no bf16 matrix units)"
    fp32_s, bf16_s = measure()
    speedup = fp32_s / bf16_s
    measured = (f"a 3x3x3 convolution step measured {fp32_s * 1e3:.0f} ms in fp32, {bf16_s * 1e3:.0f} ms in "
                f"bf16: {speedup:.2f}x")
    model = cpu.model + (f", oneDNN capped at {cpu.isa_cap}" if cpu.isa_cap else "")
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"CPU with AVX-512 bf16, no AMX ({model}): {measured}"
    return "fp32", (f"CPU without AMX ({model}, AVX-512 bf16 only): {measured}, "
                    f"below the {BF16_MIN_SPEEDUP}x that bf16 must gain")
