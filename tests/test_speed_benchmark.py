"""hyspark_benchmark speed: one run times every backend for the encoder and the full step, writes JSON + markdown."""
import json

import pytest

from conftest import run_cmd
from nnunet_hyspark.cli.benchmark import main


def test_speed_table_has_batches_the_reference_and_the_headline_ratio(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # the header names oneDNN's cap (rows run AVX2 kernels)
    main(["speed", "--what", "pretrain", "--widths", "tiny", "--patch", "32", "--steps", "1", "--warmup", "0",
          "--threads", "1", "--batch", "1", "2", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    header = result["header"]
    assert header["threads"] == 1 and header["device"] == "cpu" and header["batch"] == [1, 2]
    assert isinstance(header["cpu_amx_bf16"], bool) and isinstance(header["cpu_avx512_bf16"], bool)
    assert header["onednn_isa_cap"] == "AVX2"
    # under the AVX2 cap no bf16 units are in use: auto decides by the flags, fp32, and says so
    assert header["precision_auto"] == {"choice": "fp32", "why": header["precision_auto"]["why"]}
    assert "oneDNN capped at AVX2" in header["precision_auto"]["why"]
    rows = {(r["what"], r["backend"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("pretrain", b, n) for b in ("reference", "dense", "blocks") for n in (1, 2)}
    for what in ("pretrain",):
        base = rows[(what, "reference", 1)]
        assert base["speedup"] == 1.0
        for b in ("dense", "blocks"):
            for n in (1, 2):
                r = rows[(what, b, n)]
                assert r["samples_per_s"] == pytest.approx(n / r["median_s"])
                assert r["speedup"] == pytest.approx(r["samples_per_s"] / base["samples_per_s"])
                assert r["median_s"] > 0 and r["peak_mem_bytes"] > 0
    steps = [r for r in result["rows"] if r["what"] == "pretrain"]
    best = min((r for r in steps if r["batch"] == 1), key=lambda r: r["median_s"])
    ratio = rows[("pretrain", "reference", 1)]["median_s"] / best["median_s"]
    assert result["headline"][0].startswith(f"best step vs reference fp32 at batch 1: {ratio:.2f}x")
    # FLOPs of one step: blocks computes only the kept cells in the encoder, so fewer than dense; dense's
    # decoder composes the up-convolution with the conv after it, so fewer than the reference
    gflop = {b: rows[("pretrain", b, 1)]["gflop"] for b in ("reference", "dense", "blocks")}
    assert gflop["reference"] > gflop["dense"] > gflop["blocks"] > 0, gflop
    assert rows[("pretrain", "blocks", 2)]["gflop"] == pytest.approx(2 * gflop["blocks"], rel=0.05)
    assert f"FLOP ratio {gflop['reference'] / best['gflop']:.2f}x" in result["headline"][0]
    dense_ratio = rows[("pretrain", "dense", 1)]["median_s"] / best["median_s"]
    assert result["headline"][1].startswith(f"best step vs dense fp32 at batch 1: {dense_ratio:.2f}x")
    assert result["headline"][2].startswith("best throughput vs reference fp32 at batch 1:")
    md = (tmp_path / "speed.md").read_text()
    assert "| pretrain | fp32 | blocks | 2 |" in md and "torch threads: 1" in md
    assert f"| {rows[('pretrain', 'blocks', 2)]['gflop']:.0f} |" in md
    assert "AMX bf16: " in md and "AVX-512 bf16: " in md and result["headline"][0] in md
    out = capsys.readouterr().out
    assert "AMX bf16: " in out and "oneDNN capped at AVX2" in out
    auto_line = f"hyspark_pretrain --precision auto here: fp32 ({header['precision_auto']['why']})"
    assert auto_line in out and auto_line in md


def test_several_precisions_in_one_run_are_compared_with_the_first(tmp_path):
    main(["speed", "--what", "encoder", "--backends", "dense", "blocks", "--batch", "1", "--precision", "fp32",
          "bf16", "--widths", "tiny", "--patch", "32", "--steps", "1", "--warmup", "0", "--threads", "1",
          "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["precision"], r["backend"]) for r in rows] == [("fp32", "dense"), ("fp32", "blocks"),
                                                              ("bf16", "dense"), ("bf16", "blocks")]
    for r in rows:
        assert r["speedup"] == pytest.approx(rows[0]["median_s"] / r["median_s"])
    assert "| encoder | bf16 | blocks | 1 |" in (tmp_path / "speed.md").read_text()


def test_headline_falls_back_to_the_first_pretrain_row_without_a_reference():
    from nnunet_hyspark.benchmark.speed import headline

    rows = [{"what": "encoder", "backend": "dense", "precision": "fp32", "batch": 1, "median_s": 9.0,
             "samples_per_s": 1 / 9},
            {"what": "pretrain", "backend": "dense", "precision": "fp32", "batch": 1, "median_s": 4.0,
             "samples_per_s": 0.25},
            {"what": "pretrain", "backend": "blocks", "precision": "bf16", "batch": 1, "median_s": 2.0,
             "samples_per_s": 0.5},
            {"what": "pretrain", "backend": "blocks", "precision": "fp32", "batch": 4, "median_s": 4.0,
             "samples_per_s": 1.0}]
    assert headline(rows) == [
        "best step vs dense fp32 at batch 1: 2.00x (blocks bf16, 2.000 s vs 4.000 s)",
        "best throughput vs dense fp32 at batch 1: 4.00x (blocks fp32 at batch 4, 1.000 samples/s)"]
    assert headline(rows[:1]) == []


def test_bad_batch_sizes_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["speed", "--batch", "0", "--output", str(tmp_path)])
    assert e.value.code == 2 and "batch sizes must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "speed.json").exists()


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


def test_finetune_row_is_written_beside_the_pretraining_table(tmp_path, monkeypatch):
    """`--what finetune` asks speed_finetune for its rows with the command's patch/batch/widths and writes them
    into speed.json and speed.md (the timing itself is tested in test_finetune_speed.py)."""
    from nnunet_hyspark.benchmark import speed_finetune

    asked = {}

    def fake_rows(options):
        asked["options"] = options
        common = {"patch": list(options.patch), "batch": options.batch, "threads": 1, "step": "SGD step"}
        return [{"network": "PlainConvUNet", "params": 2e6, "median_s": 1.0, "samples_per_s": 2.0,
                 "ratio_vs_nnunet": 1.0, "gflop": 100.0, "flop_ratio_vs_nnunet": 1.0, **common},
                {"network": "HySparKUNet", "params": 3e6, "median_s": 2.5, "samples_per_s": 0.8,
                 "ratio_vs_nnunet": 2.5, "gflop": 190.0, "flop_ratio_vs_nnunet": 1.9, **common}]

    monkeypatch.setattr(speed_finetune, "finetune_rows", fake_rows)
    assert main(["speed", "--what", "finetune", "--widths", "tiny", "--patch", "32", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--output", str(tmp_path)]) == 0
    assert asked["options"].patch == (32, 32, 32) and asked["options"].batch == 2
    assert asked["options"].widths == "tiny"
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["network"] for r in result["finetune"]] == ["PlainConvUNet", "HySparKUNet"]
    assert "| HySparKUNet | 3.0 M | 2.500 | 0.800 | 2.50x | 190 | 1.90x |" in (tmp_path / "speed.md").read_text()


def test_finetune_row_refuses_custom_widths_before_timing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["speed", "--what", "finetune", "--widths", "8,16,32,64,128", "--output", str(tmp_path)])
    assert e.value.code == 2 and "--what finetune times base or tiny widths" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
