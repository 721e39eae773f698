"""hyspark_benchmark speed: one run times every backend for the encoder and the full step, writes JSON + markdown."""
import json

import pytest

from conftest import run_cmd
from nnunet_hyspark.cli.benchmark import main


def test_speed_writes_a_table_with_ratios_against_dense(tmp_path, capsys):
    main(["speed", "--widths", "tiny", "--patch", "32", "--steps", "1", "--warmup", "0", "--threads", "1",
          "--output", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["header"]["threads"] == 1 and result["header"]["device"] == "cpu"
    rows = {(r["what"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {("encoder", "dense"), ("encoder", "blocks"), ("pretrain", "dense"), ("pretrain", "blocks")}
    for what in ("encoder", "pretrain"):
        dense, blocks = rows[(what, "dense")], rows[(what, "blocks")]
        assert dense["speedup"] == 1.0
        assert blocks["speedup"] == pytest.approx(dense["median_s"] / blocks["median_s"])
        assert blocks["median_s"] > 0 and blocks["peak_mem_bytes"] > 0
    md = (tmp_path / "speed.md").read_text()
    assert "| encoder | fp32 | blocks |" in md and "torch threads: 1" in md


def test_several_precisions_in_one_run_are_compared_with_the_first(tmp_path):
    main(["speed", "--what", "encoder", "--precision", "fp32", "bf16", "--widths", "tiny", "--patch", "32",
          "--steps", "1", "--warmup", "0", "--threads", "1", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["precision"], r["backend"]) for r in rows] == [("fp32", "dense"), ("fp32", "blocks"),
                                                              ("bf16", "dense"), ("bf16", "blocks")]
    for r in rows:
        assert r["speedup"] == pytest.approx(rows[0]["median_s"] / r["median_s"])
    assert "| encoder | bf16 | blocks |" in (tmp_path / "speed.md").read_text()


def test_fp16_is_refused_on_the_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["speed", "--precision", "fp16", "--output", str(tmp_path)])
    assert e.value.code == 2 and "fp16 needs --device cuda" in capsys.readouterr().err


def test_speed_refuses_spconv_on_the_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["speed", "--backends", "dense", "spconv", "--output", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")


@pytest.mark.e2e
def test_data_pipeline_alone_reports_crops_per_second_at_the_plans_patch(synthetic_ct, tmp_path):
    proc = run_cmd(["hyspark_benchmark", "speed", "--what", "data", "-d", str(synthetic_ct["unlabeled"]),
                    "--output", str(tmp_path)], synthetic_ct["env"])
    data = json.loads((tmp_path / "speed.json").read_text())["data"]
    plans = json.loads(next((synthetic_ct["preprocessed"]).glob("Dataset502_*/nnUNetHySparKPlans.json")).read_text())
    assert list(data["patch_size"]) == plans["configurations"]["3d_fullres"]["patch_size"]
    assert data["crops_per_second"] > 0
    md = (tmp_path / "speed.md").read_text()
    assert "crops/s" in md and "| what |" not in md  # no empty step table when only the data was timed
    assert "crops/s" in proc.stdout
