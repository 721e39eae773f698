"""CPU features from /proc/cpuinfo text, and what ``--precision auto`` makes of them (no real CPU needed)."""
from dataclasses import replace

import pytest

from nnunet_hyspark.hardware import (BF16_MIN_SPEEDUP, CpuInfo, auto_precision, cpu_info, onednn_isa_cap,
                                     parse_cpuinfo, time_bf16_against_fp32)


def _cpuinfo(model: str, flags: str, processors: int = 2) -> str:
    block = f"processor\t: {{i}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
    return "".join(block.format(i=i) for i in range(processors))


SAPPHIRE = _cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
COOPER = _cpuinfo("Intel(R) Xeon(R) Platinum 8380H", "avx512f avx512_bf16")
EPYC = _cpuinfo("AMD EPYC", "fma bmi2")
GENOA = _cpuinfo("AMD EPYC", "fma bmi2 avx512f avx512_bf16")  # Zen 4: AVX-512 bf16, no AMX


def no_gain():  # a timing in which bf16 gains nothing: (fp32 s, bf16 s)
    return 1.0, 1.0


def must_not_time():
    raise AssertionError("the CPU's flags decide here: nothing should be timed")


def test_cpuinfo_flags_are_read_from_the_first_processor():
    cpu = parse_cpuinfo(SAPPHIRE, cores=2)
    assert cpu == CpuInfo("Intel(R) Xeon(R) Platinum 8480+", 2, amx_bf16=True, avx512_bf16=True)
    assert parse_cpuinfo(COOPER, cores=2) == CpuInfo("Intel(R) Xeon(R) Platinum 8380H", 2, False, True)
    assert parse_cpuinfo(EPYC, cores=2).describe() == "AMD EPYC, 2 cores, AMX bf16: no, AVX-512 bf16: no"
    assert parse_cpuinfo(_cpuinfo("X", "amx_bf16_not_a_flag")).amx_bf16 is False  # whole flags only


def test_unreadable_cpuinfo_means_no_features(tmp_path):
    cpu = cpu_info(str(tmp_path / "missing"))
    assert not cpu.amx_bf16 and not cpu.avx512_bf16 and cpu.model and cpu.cores >= 1


@pytest.mark.parametrize("text,device,want", [(SAPPHIRE, "cpu", "bf16"), (EPYC, "cpu", "fp32"),
                                              (EPYC, "cuda", "bf16"), (SAPPHIRE, "mps", "fp32")])
def test_auto_precision_follows_the_flags_without_timing_on_cuda_amx_and_cpus_without_bf16(text, device, want):
    precision, why = auto_precision(device, parse_cpuinfo(text), measure=must_not_time)
    assert precision == want
    assert ("without AMX" in why) == (device == "cpu" and want == "fp32")


@pytest.mark.parametrize("text", [COOPER, GENOA])
@pytest.mark.parametrize("fp32_s,bf16_s,want", [(1.0, 0.55, "bf16"), (1.0, 1.0 / BF16_MIN_SPEEDUP, "bf16"),
                                                (1.0, 0.9, "fp32"), (1.0, 1.3, "fp32")])
def test_auto_precision_times_bf16_on_cpus_with_avx512_bf16_but_no_amx(text, fp32_s, bf16_s, want):
    """Such CPUs differ (an Intel Xeon ran bf16 slower, a Zen 4 EPYC 1.8x faster): the timing decides, and
    bf16 must gain at least BF16_MIN_SPEEDUP."""
    calls = []

    def measure():
        calls.append(1)
        return fp32_s, bf16_s

    precision, why = auto_precision("cpu", parse_cpuinfo(text), measure=measure)
    assert (precision, len(calls)) == (want, 1)
    assert f"{fp32_s / bf16_s:.2f}x" in why and "AVX-512 bf16" in why
    assert f"{fp32_s * 1e3:.0f} ms in fp32, {bf16_s * 1e3:.0f} ms in bf16" in why


def test_bf16_timing_runs_a_real_convolution_both_ways_and_leaves_the_global_random_stream_alone():
    import torch

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    fp32_s, bf16_s = time_bf16_against_fp32(channels=4, size=8, repeats=1)
    assert 0 < fp32_s < 10 and 0 < bf16_s < 10
    assert torch.equal(torch.rand(3), want)  # a seeded run draws the same numbers with or without the timing


def test_pretrain_precision_auto_resolves_once_and_says_why(capsys):
    from nnunet_hyspark.pretraining import run

    opts = run.PretrainOptions(datasets=["1"], precision="auto")
    resolved, notes = run.resolve_precision(opts, "cpu", parse_cpuinfo(EPYC))
    assert resolved.precision == "fp32" and resolved == replace(opts, precision="fp32")
    assert notes == [capsys.readouterr().out.strip()] and notes[0].startswith("--precision auto: fp32 (CPU without AMX")
    assert run.resolve_precision(opts, "cpu", parse_cpuinfo(SAPPHIRE))[0].precision == "bf16"
    resolved, notes = run.resolve_precision(opts, "cuda")
    assert resolved.precision == "bf16" and notes == ["--precision auto: bf16 (CUDA device)"]
    assert run.resolve_precision(replace(opts, precision="fp32"), "cuda") == (replace(opts, precision="fp32"), [])


def test_onednn_isa_cap_is_read_from_either_variable_and_all_means_none():
    assert onednn_isa_cap({}) is None
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}) == "AVX512_CORE_BF16"
    assert onednn_isa_cap({"DNNL_MAX_CPU_ISA": "AVX2"}) == "AVX2"
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "ALL", "DNNL_MAX_CPU_ISA": "DEFAULT"}) is None
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "", "DNNL_MAX_CPU_ISA": "AVX2"}) == "AVX2"


@pytest.mark.parametrize("cap,amx,avx512_bf16", [(None, True, True), ("AVX512_CORE_AMX", True, True),
                                                 ("AVX512_CORE_BF16", False, True), ("AVX10_1_512", False, True),
                                                 ("AVX512_CORE", False, False), ("AVX2", False, False)])
def test_a_onednn_cap_hides_the_features_above_it(cap, amx, avx512_bf16):
    cpu = parse_cpuinfo(SAPPHIRE, cores=2, isa_cap=cap)
    assert (cpu.amx_bf16, cpu.avx512_bf16) == (True, True)  # the flags stay what the CPU has
    assert (cpu.amx_in_use, cpu.avx512_bf16_in_use) == (amx, avx512_bf16)
    assert auto_precision("cpu", cpu, measure=no_gain)[0] == ("bf16" if amx else "fp32")
    assert ("not used (ONEDNN_MAX_CPU_ISA=" in cpu.describe()) == (cap is not None and not amx)


def test_auto_precision_under_a_cap_says_the_cap_and_cuda_ignores_it():
    capped = parse_cpuinfo(SAPPHIRE, cores=2, isa_cap="AVX512_CORE_BF16")
    precision, why = auto_precision("cpu", capped, measure=no_gain)
    assert precision == "fp32" and "oneDNN capped at AVX512_CORE_BF16" in why
    precision, why = auto_precision("cpu", parse_cpuinfo(SAPPHIRE, cores=2, isa_cap="AVX2"), measure=must_not_time)
    assert precision == "fp32" and "oneDNN capped at AVX2" in why
    assert auto_precision("cuda", capped)[0] == "bf16"
    assert parse_cpuinfo(SAPPHIRE, cores=2).describe() == (
        "Intel(R) Xeon(R) Platinum 8480+, 2 cores, AMX bf16: yes, AVX-512 bf16: yes")


def test_cpu_info_reads_this_process_cap(monkeypatch, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu = cpu_info(str(path))
    assert cpu.isa_cap == "AVX2" and not cpu.amx_in_use and not cpu.avx512_bf16_in_use
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert cpu_info(str(path)).amx_in_use
