"""CPU features from /proc/cpuinfo text, and what ``--precision auto`` makes of them (no real CPU needed)."""
from dataclasses import replace

import pytest

from nnunet_hyspark.hardware import CpuInfo, auto_precision, cpu_info, parse_cpuinfo


def _cpuinfo(model: str, flags: str, processors: int = 2) -> str:
    block = f"processor\t: {{i}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
    return "".join(block.format(i=i) for i in range(processors))


SAPPHIRE = _cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
COOPER = _cpuinfo("Intel(R) Xeon(R) Platinum 8380H", "avx512f avx512_bf16")
EPYC = _cpuinfo("AMD EPYC", "fma bmi2")


def test_cpuinfo_flags_are_read_from_the_first_processor():
    cpu = parse_cpuinfo(SAPPHIRE, cores=2)
    assert cpu == CpuInfo("Intel(R) Xeon(R) Platinum 8480+", 2, amx_bf16=True, avx512_bf16=True)
    assert parse_cpuinfo(COOPER, cores=2) == CpuInfo("Intel(R) Xeon(R) Platinum 8380H", 2, False, True)
    assert parse_cpuinfo(EPYC, cores=2).describe() == "AMD EPYC, 2 cores, AMX bf16: no, AVX-512 bf16: no"
    assert parse_cpuinfo(_cpuinfo("X", "amx_bf16_not_a_flag")).amx_bf16 is False  # whole flags only


def test_unreadable_cpuinfo_means_no_features(tmp_path):
    cpu = cpu_info(str(tmp_path / "missing"))
    assert not cpu.amx_bf16 and not cpu.avx512_bf16 and cpu.model and cpu.cores >= 1


@pytest.mark.parametrize("text,device,want", [(SAPPHIRE, "cpu", "bf16"), (COOPER, "cpu", "fp32"),
                                              (EPYC, "cpu", "fp32"), (EPYC, "cuda", "bf16"),
                                              (SAPPHIRE, "mps", "fp32")])
def test_auto_precision_is_bf16_on_cuda_and_amx_cpus_only(text, device, want):
    precision, why = auto_precision(device, parse_cpuinfo(text))
    assert precision == want
    assert ("without AMX" in why) == (device == "cpu" and want == "fp32")


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
