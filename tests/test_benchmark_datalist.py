"""``--splits`` with a MONAI-style datalist (the format in which papers publish their folds).

Unit tests of the mapping image file -> nnU-Net case id, and ``hyspark_benchmark folds`` in-process:
the fold table of ``--dry-run``, the installed splits_final.json, and every bad datalist ending with
exit status 2, one line and nothing written.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nnunet_hyspark.benchmark import datalist as D
from nnunet_hyspark.benchmark import folds as F
from nnunet_hyspark.benchmark import splits as S
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.planning import completeness
from fakes import run_benchmark_cli as cli

DS = "Dataset001_Toy"
PLANS = "nnUNetHySparKPlans"
CONF = "3d_fullres"
CASES = [f"img{i:04d}" for i in range(1, 7)]  # nnU-Net files img0001_0000.nii.gz ...
FOLD_OF = {c: i % 3 for i, c in enumerate(CASES)}  # img0001 -> 0, img0002 -> 1, img0003 -> 2, img0004 -> 0 ...


def datalist(cases=CASES, image="imagesTr/{c}.nii.gz", **extra) -> dict:
    return {"name": "Toy", **extra, "training": [
        {"image": image.format(c=c), "label": f"labelsTr/{c}.nii.gz", "fold": FOLD_OF.get(c, 0)} for c in cases]}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def nn(tmp_path, monkeypatch):
    """A minimal nnU-Net tree (raw images named as nnU-Net wants, plans, a complete preprocessed folder)."""
    raw, pre, res = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    dataset_json = {"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "CT"}, "numTraining": len(CASES)}
    (raw / DS / "imagesTr").mkdir(parents=True)
    for c in CASES:
        (raw / DS / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
    (raw / DS / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / DS / f"{PLANS}_{CONF}").mkdir(parents=True)
    (pre / DS / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / DS / f"{PLANS}.json").write_text(json.dumps({"configurations": {CONF: {}}}))
    completeness.write_marker(pre / DS / f"{PLANS}_{CONF}", len(CASES))
    res.mkdir()
    for k, v in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(k, str(v))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"pre": pre, "res": res, "tmp": tmp_path, "inputs": inputs}


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "inputs" not in p.parts}


def folds_args(splits: Path, *extra: str) -> list[str]:
    return ["folds", "-d", "1", "-c", CONF, "-p", PLANS, "--device", "cpu", "--arms", "scratch=nnUNetTrainerHySparK",
            "--splits", str(splits), *extra]


def expected_splits(cases=CASES) -> list[dict]:
    return [{"train": sorted(c for c in cases if FOLD_OF[c] != k), "val": sorted(c for c in cases if FOLD_OF[c] == k)}
            for k in range(3)]


# --------------------------------------------------------------------------- mapping

@pytest.mark.parametrize("image, case", [
    ("imagesTr/img0001.nii.gz", "img0001"),
    ("./imagesTr/img0001.nii", "img0001"),
    ("/data/BTCV/imagesTr/img0001.nrrd", "img0001"),
    ("img0001.mha", "img0001"),
    ("imagesTr\\img0001.NII.GZ", "img0001"),
    ("imagesTr/img0001_0000.nii.gz", "img0001"),  # the datalist names nnU-Net's channel file
    ("imagesTr/img0099.nii.gz", None),
    ("imagesTr/img0001_ct.nii.gz", None),
])
def test_case_from_image_by_file_name(image, case):
    assert D.case_from_image(image, set(CASES)) == case


def test_case_from_image_prefers_an_exact_case_over_stripping_the_channel():
    assert D.case_from_image("x/a_0000.nii.gz", {"a", "a_0000"}) == "a_0000"


def test_case_id_pattern_group_or_named_group():
    rx = D.compile_pattern(r"ct_(img\d+)\.nii")
    assert D.case_from_image("imagesTr/ct_img0002.nii.gz", set(CASES), rx) == "img0002"
    rx = D.compile_pattern(r"(?P<sub>sub\d)/(?P<case>img\d+)_ct")
    assert D.case_from_image("sub1/img0003_ct.nii.gz", set(CASES), rx) == "img0003"
    assert D.case_from_image("other/img0003.nii.gz", set(CASES), rx) is None
    with pytest.raises(HySparKError, match="has 2 capture groups"):
        D.compile_pattern(r"(a)(b)")
    with pytest.raises(HySparKError, match="not a valid regular expression"):
        D.compile_pattern(r"img(\d+")


def test_datalist_becomes_nnunet_splits(tmp_path):
    data = datalist(validation=[{"image": "imagesTr/img0001.nii.gz"}])  # other keys are ignored
    splits = S.load_splits_file(write(tmp_path / "dl.json", data), CASES)
    assert splits == expected_splits()
    S.validate_splits(splits, CASES)


def test_datalist_multichannel_images_and_string_folds(tmp_path):
    data = {"training": [{"image": [f"imagesTr/{c}_0000.nii.gz", f"imagesTr/{c}_0001.nii.gz"],
                          "fold": str(FOLD_OF[c])} for c in CASES]}
    assert S.load_splits_file(write(tmp_path / "dl.json", data), CASES) == expected_splits()


def test_datalist_with_case_id_pattern(tmp_path):
    data = datalist(image="volumes/{c}/ct.nii.gz")
    with pytest.raises(HySparKError, match="6 entries name no case"):
        S.load_splits_file(write(tmp_path / "dl.json", data), CASES)
    assert S.load_splits_file(tmp_path / "dl.json", CASES, case_id_pattern=r"volumes/([^/]+)/") == expected_splits()


def test_partial_datalist_refused_in_one_line_then_allowed(tmp_path, capsys):
    data = datalist(cases=CASES[:4] + ["img0100", "img0101", "img0102", "img0103"])
    path = write(tmp_path / "dl.json", data)
    with pytest.raises(HySparKError) as e:
        S.load_splits_file(path, CASES)
    msg = str(e.value.args[0])
    assert ("4 entries name no case of the dataset (e.g. imagesTr/img0100.nii.gz, imagesTr/img0101.nii.gz, "
            "imagesTr/img0102.nii.gz, ...) and 2 dataset case(s) have no entry (e.g. img0005, img0006)") in msg
    assert "--allow-partial-splits" in e.value.hint
    splits = S.load_splits_file(path, CASES, allow_partial=True)
    assert splits == expected_splits(CASES[:4])
    assert "using the 4 case(s) both name" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("training: []", "is not valid JSON"),  # a .json file is JSON or an error, never the text format
    ({"training": []}, "has no folds (0 training entries"),
    ({"training": [{"image": "imagesTr/img0001.nii.gz"}]}, "has no folds (1 training entries, none with 'fold')"),
    ({"validation": []}, "has no 'training' list (keys: validation)"),
    ({"training": [{"label": "x.nii.gz", "fold": 0}]}, "training entry 0 has no 'image' path"),
    ({"training": [{"image": "imagesTr/img0001.nii.gz", "fold": -1}]}, "has fold -1"),
])
def test_bad_datalists(tmp_path, content, message):
    with pytest.raises(HySparKError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S.load_splits_file(write(tmp_path / "dl.json", content), CASES)


def test_datalist_with_a_fixed_validation_list_names_the_way_out(tmp_path):
    data = {"training": [{"image": "imagesTr/img0001.nii.gz"}], "validation": [{"image": "imagesTr/img0002.nii.gz"}]}
    with pytest.raises(HySparKError, match="has no folds") as e:
        S.load_splits_file(write(tmp_path / "dl.json", data), CASES)
    assert "one fixed split" in e.value.hint


def test_datalist_fold_gaps_and_duplicates(tmp_path):
    data = datalist()
    for entry in data["training"]:
        entry["fold"] = 2 * entry["fold"]
    with pytest.raises(HySparKError, match=r"fold\(s\) \[1, 3\] have no cases"):
        S.load_splits_file(write(tmp_path / "dl.json", data), CASES)
    data = datalist()
    data["training"].append({"image": "imagesTr/img0001_0000.nii.gz", "fold": 1})
    with pytest.raises(HySparKError, match="img0001"):
        S.load_splits_file(write(tmp_path / "dl.json", data), CASES)


def test_fold_table_lists_validation_cases_and_training_counts():
    lines = S.fold_table(expected_splits(), [0, 2], "dl.json")
    assert lines == ["folds from dl.json: 3 fold(s), 6 case(s)",
                     "  fold 0: 4 training case(s); validation (2): img0001 img0004",
                     "  fold 2: 4 training case(s); validation (2): img0003 img0006"]


# --------------------------------------------------------------------------- through hyspark_benchmark folds

def test_dry_run_prints_the_fold_table_and_writes_nothing(nn, capsys):
    path = write(nn["inputs"] / "dataset_0.json", datalist())
    before = snapshot(nn["tmp"])
    status, out, err = cli(folds_args(path, "--dry-run"), capsys)
    assert status == 0, err
    assert f"folds from {path}: 3 fold(s), 6 case(s)" in out
    assert "  fold 1: 4 training case(s); validation (2): img0002 img0005" in out
    assert f"nnUNetv2_train 1 {CONF} 2 -tr nnUNetTrainerHySparK -p {PLANS} -device cpu" in out
    assert snapshot(nn["tmp"]) == before


def test_datalist_installed_as_splits_final(nn):
    path = write(nn["inputs"] / "dataset_0.json", datalist())
    spec = F.build_spec("1", CONF, PLANS, ["scratch=nnUNetTrainerHySparK"], folds=[0], splits_file=str(path))

    def runner(cmd, env, log):  # a fold that fails at once: only the installed splits matter here
        return 1

    F.run_benchmark(spec, runner=runner, out=io.StringIO())
    installed = json.loads((nn["pre"] / DS / S.SPLITS_FILENAME).read_text())
    assert installed == expected_splits()


@pytest.mark.parametrize("content, extra, message", [
    ("{oops", (), "is not valid JSON"),
    ({"training": [{"image": f"imagesTr/{c}.nii.gz"} for c in CASES]}, (), "has no folds"),
    (datalist(cases=CASES[:5] + ["img0042"]), (),
     "1 entry names no case of the dataset (e.g. imagesTr/img0042.nii.gz) and 1 dataset case(s) have no entry "
     "(e.g. img0006) -> --case-id-pattern REGEX maps other file names to case ids, or pass --allow-partial-splits"),
    (datalist(), ("--case-id-pattern", "(a)(b)"), "has 2 capture groups"),
])
def test_bad_datalist_ends_before_training(nn, capsys, content, extra, message):
    path = write(nn["inputs"] / "dataset_0.json", content)
    before = snapshot(nn["tmp"])
    status, _, err = cli(folds_args(path, *extra), capsys)
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert snapshot(nn["tmp"]) == before


def test_datalist_options_need_a_datalist(nn, capsys):
    status, _, err = cli(["folds", "-d", "1", "-p", PLANS, "--arms", "nnUNetTrainerHySparK", "--dry-run",
                          "--allow-partial-splits"], capsys)
    assert status == 2 and "need a datalist given to --splits" in err
    text = write(nn["inputs"] / "splits.txt", "".join(f"{c} {FOLD_OF[c]}\n" for c in CASES))
    status, _, err = cli(folds_args(text, "--dry-run", "--case-id-pattern", "(img.*)"), capsys)
    assert status == 2 and "apply to datalists only" in err


def test_partial_datalist_allowed_by_flag(nn, capsys):
    path = write(nn["inputs"] / "dataset_0.json", datalist(cases=CASES[:5] + ["img0042"]))
    status, out, err = cli(folds_args(path, "--dry-run", "--allow-partial-splits"), capsys)
    assert status == 0, err
    assert "folds from" in out and "3 fold(s), 5 case(s)" in out and "warning: datalist" in err
