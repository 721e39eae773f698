"""scripts/gpu_check.sh's code on the CPU: every stage of a smoke run writes its section of the report, a
failing stage is recorded while the others still run, bad options are refused before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_hyspark.benchmark.gpu_check import run
from nnunet_hyspark.benchmark.gpu_options import STAGES, smoke_options
from nnunet_hyspark.benchmark.gpu_stages import cuda_only_tests
from nnunet_hyspark.cli.gpu_check import main
from nnunet_hyspark.hardware import cpu_info

TESTS = Path(__file__).resolve().parent


def test_the_cuda_only_tests_are_found_by_their_skip_markers():
    nodes = cuda_only_tests(TESTS)
    assert "tests/test_sparse_backends.py::test_cuda_backends_match_dense" in nodes
    assert "tests/test_cuda_precision.py::test_fp16_with_the_gradient_scaler_trains_on_cuda" in nodes
    assert "tests/test_cuda_precision.py::test_sparse_backend_model_matches_dense_on_cuda" in nodes
    assert "tests/test_sparse_backends.py::test_spconv_refused_on_cpu" not in nodes  # skips WITH cuda
    assert not any("test_gpu_check" in n for n in nodes)


def test_smoke_run_writes_every_section(tmp_path):
    """All stages in this process (the GPU run isolates them; see the next test), one method for memory."""
    md = run(smoke_options(output=str(tmp_path), isolate=False, methods=("hiend_mae",)), say=lambda s: None)
    data = json.loads((tmp_path / "report.json").read_text())
    assert {n: data["stages"][n]["status"] for n in STAGES} == {n: "ok" for n in STAGES}, data
    r = {n: data["stages"][n]["result"] for n in STAGES}
    assert r["env"]["device"] == "cpu" and "spconv" in r["env"]["packages"]
    assert r["env"]["cpu"] == cpu_info().model  # the host CPU, named as everywhere else
    assert r["tests"]["counts"]["failed"] == 0 and r["tests"]["counts"]["skipped"] == len(r["tests"]["cases"]) > 0
    assert r["memory"]["rows"]["hiend_mae"]["estimate_gib"] > 0  # nothing measured on the CPU, but it ran
    assert r["memory"]["rows"]["hiend_mae"]["finetune"]["step_s"] > 0
    assert "crop" in r["memory"]["rows"]["hiend_mae"]["pretrain"]
    speed = {row["backend"]: row for row in r["speed"]["rows"]}
    assert speed["dense"]["median_s"] > 0 and speed["dense"]["speedup_vs_dense_fp32"] == 1.0
    assert "spconv" in speed["spconv"]["error"]  # refused on the CPU, recorded, the stage still ok
    assert [len(v) for v in r["loss"]["losses"].values()] == [2, 2]
    assert r["loss"]["summary"]["fp32"]["first"] == pytest.approx(r["loss"]["summary"]["bf16"]["first"], rel=0.05)
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    for title in ("## env", "## tests", "## memory", "## speed", "## loss", "| dense | fp32 |", "![loss curves]"):
        assert title in text, title
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "loss_curves.png", "report.json",
                                                          "report.md"]


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    """Isolated stages (own processes, as on the GPU): the loss stage fails (spconv needs CUDA), env is kept."""
    run(smoke_options(output=str(tmp_path), stages=("loss", "env"), loss_backend="spconv"), say=lambda s: None)
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert stages["loss"]["status"] == "failed" and "CUDA" in stages["loss"]["error"]
    assert stages["env"]["status"] == "ok" and stages["env"]["result"]["torch"]
    text = (tmp_path / "report.md").read_text()
    assert "status: **failed**" in text and "status: **ok**" in text


def test_stages_past_the_budget_are_skipped_and_still_reported(tmp_path):
    run(smoke_options(output=str(tmp_path), budget_s=1), say=lambda s: None)
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert {n: e["status"] for n, e in stages.items()} == {n: "skipped" for n in STAGES}
    text = (tmp_path / "report.md").read_text()
    assert all(f"## {n}" in text for n in STAGES) and "no time left" in text


@pytest.mark.parametrize("args,message", [(["--stages", "env", "nope"], "unknown stage"),
                                          (["--patch", "40"], "not a positive multiple of 16"),
                                          (["--loss-steps", "0"], "at least 1")])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        main([str(out), "--smoke", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
