"""Arms with their own plans (``LABEL=TRAINER[@PLANS][:WEIGHTS]``) and the checks every arm passes before any fold.

The nnU-Net tree is written by tests/fakes.py (one preprocessed dataset, several plans); training is never
started: bad inputs must end in ``hyspark_benchmark folds`` with exit status 2 and nothing written, good ones
are shown by ``--dry-run`` (the exact ``nnUNetv2_train`` commands) or by an injected runner.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from fakes import run_benchmark_cli as cli
from fakes import write_fake_preprocessed_dataset
from nnunet_hyspark.benchmark import arm_checks
from nnunet_hyspark.benchmark import folds as F
from nnunet_hyspark.benchmark import spec as spec_mod
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import get_method
from nnunet_hyspark.weights import save_weights_file

DS = "Dataset001_Toy"
CONF = "3d_fullres"
HYSPARK_PLANS = get_method("hyspark").plans_name
HY_FT = get_method("hyspark").finetune_trainer
CASES = [f"case_{i:03d}" for i in range(4)]
#: plans written by the fixture -> spacing (so weights can fit one and not another)
PLANS_SPACING = {"nnUNetPlans": (3.0, 3.0, 3.0), "nnUNetResEncUNetMPlans": (3.0, 3.0, 3.0),
                 HYSPARK_PLANS: (1.5, 1.5, 1.5), get_method("mim").plans_name: (1.5, 1.5, 1.5),
                 get_method("hiend_mae").plans_name: (1.5, 1.5, 1.5)}


def weights_file(path: Path, spacing) -> Path:
    """One of our weights files whose metadata records the pre-training's preprocessing."""
    meta = {"spacing": list(spacing), "normalization_schemes": ["CTNormalization"]}
    return save_weights_file({"encoder.w": torch.zeros(1)}, meta, path)


@pytest.fixture
def nn(tmp_path, monkeypatch):
    raw, pre, res = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    (raw / DS / "imagesTr").mkdir(parents=True)
    for c in CASES:
        (raw / DS / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
    for plans, spacing in PLANS_SPACING.items():
        write_fake_preprocessed_dataset(str(pre), 1, "Toy", shapes=((1, 8, 8, 8),) * len(CASES),
                                        patch_size=(8, 8, 8), spacing=spacing, plans_identifier=plans)
    (raw / DS / "dataset.json").write_text((pre / DS / "dataset.json").read_text())
    res.mkdir()
    for k, v in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(k, str(v))
    return {"pre": pre, "res": res, "tmp": tmp_path,
            "w15": weights_file(tmp_path / "w15.pth", (1.5, 1.5, 1.5)),
            "w30": weights_file(tmp_path / "w30.pth", (3.0, 3.0, 3.0))}


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def folds_args(*arms: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["folds", "-d", "1", "-c", CONF, "-p", HYSPARK_PLANS, "-f", "0", "1", "--device", "cpu",
            "--arms", *arms, *extra]


# --------------------------------------------------------------------------- parsing

def test_parse_arm_with_plans_and_weights():
    assert F.parse_arm("nnunet=nnUNetTrainer@nnUNetPlans") == F.Arm("nnunet", "nnUNetTrainer", None, "nnUNetPlans")
    assert F.parse_arm("nnUNetTrainer_5epochs@nnUNetResEncUNetMPlans") == F.Arm(
        "nnUNetTrainer_5epochs", "nnUNetTrainer_5epochs", None, "nnUNetResEncUNetMPlans")
    # '@' and '=' inside the weights path belong to the path
    assert F.parse_arm(f"h={HY_FT}@{HYSPARK_PLANS}:/w/a@b=c.pth") == F.Arm("h", HY_FT, "/w/a@b=c.pth", HYSPARK_PLANS)
    assert F.parse_arm(f"h={HY_FT}:/w/a@b.pth") == F.Arm("h", HY_FT, "/w/a@b.pth", None)
    for bad in ("a=T@", "a=T@bad plans", "a=T@P@Q", "a=@P"):
        with pytest.raises(HySparKError, match="invalid arm"):
            F.parse_arm(bad)


def test_arm_dict_round_trip_and_older_manifests():
    arm = F.Arm("r", "nnUNetTrainer", None, "nnUNetResEncUNetMPlans")
    assert arm.as_dict() == {"label": "r", "trainer": "nnUNetTrainer", "weights": None,
                             "plans": "nnUNetResEncUNetMPlans"}
    assert F.Arm.from_dict(arm.as_dict()) == arm
    assert F.Arm.from_dict({"label": "s", "trainer": "T", "weights": "/w.pth"}) == F.Arm("s", "T", "/w.pth", None)


def test_labels_unique_and_output_folders_distinct():
    with pytest.raises(HySparKError, match="two arms share the label 'a'"):
        F.resolve_arms(["a=nnUNetTrainer@nnUNetPlans", "a=nnUNetTrainer_5epochs"], None, default_plans="P")
    # same trainer, other plans: other results folder, fine
    arms = F.resolve_arms(["n=nnUNetTrainer@nnUNetPlans", "r=nnUNetTrainer@nnUNetResEncUNetMPlans",
                           "d=nnUNetTrainer"], None, default_plans=HYSPARK_PLANS)
    assert [a.plans for a in arms] == ["nnUNetPlans", "nnUNetResEncUNetMPlans", None]
    # an arm without @PLANS uses -p: same folder as an explicit arm with -p's plans
    with pytest.raises(HySparKError, match=r"arms 'a' and 'b' both train nnUNetTrainer with nnUNetPlans"):
        F.resolve_arms(["a=nnUNetTrainer", "b=nnUNetTrainer@nnUNetPlans"], None, default_plans="nnUNetPlans")


def test_spec_uses_each_arms_plans(tmp_path):
    arms = [F.Arm("nnunet", "nnUNetTrainer", None, "nnUNetPlans"), F.Arm("scratch", "nnUNetTrainerHySparK")]
    spec = F.BenchmarkSpec("1", DS, CONF, HYSPARK_PLANS, arms, [0], tmp_path, tmp_path / "out")
    assert spec.arm_plans(arms[0]) == "nnUNetPlans" and spec.arm_plans(arms[1]) == HYSPARK_PLANS
    assert spec.fold_dir(arms[0], 0) == tmp_path / DS / f"nnUNetTrainer__nnUNetPlans__{CONF}" / "fold_0"
    assert spec.fold_dir(arms[1], 0) == tmp_path / DS / f"nnUNetTrainerHySparK__{HYSPARK_PLANS}__{CONF}" / "fold_0"
    cmd = F.train_command(spec, arms[0], 0, resume=False)
    assert cmd[cmd.index("-p") + 1] == "nnUNetPlans"
    cmd = F.train_command(spec, arms[1], 0, resume=False)
    assert cmd[cmd.index("-p") + 1] == HYSPARK_PLANS


@pytest.mark.parametrize("plans, configuration, command", [
    ("nnUNetPlans", CONF, "nnUNetv2_plan_and_preprocess -d 1"),
    ("nnUNetResEncUNetMPlans", CONF, "nnUNetv2_plan_and_preprocess -d 1 -pl nnUNetPlannerResEncM"),
    ("nnUNetResEncUNetXLPlans", "3d_lowres", "nnUNetv2_plan_and_preprocess -d 1 -pl nnUNetPlannerResEncXL"),
    (HYSPARK_PLANS, CONF, "hyspark_plan_and_preprocess -d 1"),
    (HYSPARK_PLANS, "2d", "hyspark_plan_and_preprocess -d 1 -c 2d"),
    (get_method("mim").plans_name, CONF, "hyspark_plan_and_preprocess -d 1 --network mim"),
    (get_method("hiend_mae").plans_name, CONF, "hyspark_plan_and_preprocess -d 1 --network hiend_mae"),
    ("MyPlans", CONF, "hyspark_plan_and_preprocess -d 1 --plans-name MyPlans (or nnU-Net's "
                      "nnUNetv2_plan_and_preprocess -d 1 -overwrite_plans_name MyPlans)"),
])
def test_plans_command_names_the_command_that_writes_the_plans(nn, plans, configuration, command):
    assert arm_checks.plans_command(DS, plans, configuration) == command


# --------------------------------------------------------------------------- good arms

def test_readme_arms_with_their_own_plans_dry_run(nn, capsys):
    """The README's arms, nnU-Net's short trainer and the MiM / Hi-End-MAE fine-tuning arms in one benchmark."""
    mim, hiend = get_method("mim"), get_method("hiend_mae")
    arms = ["nnunet=nnUNetTrainer@nnUNetPlans", "resenc=nnUNetTrainer@nnUNetResEncUNetMPlans",
            "short=nnUNetTrainer_5epochs@nnUNetPlans", f"scratch=nnUNetTrainerHySparK@{HYSPARK_PLANS}",
            f"hyspark={HY_FT}@{HYSPARK_PLANS}:{nn['w15']}",
            f"mim={mim.finetune_trainer}@{mim.plans_name}:{nn['w15']}",
            f"hiend={hiend.finetune_trainer}@{hiend.plans_name}:{nn['w15']}"]
    before = snapshot(nn["tmp"])
    status, out, err = cli([*folds_args(*arms), "--dry-run"], capsys)
    assert status == 0, err
    commands = [line.split("   #")[0] for line in out.splitlines() if line.startswith("nnUNetv2_train 1")]
    assert f"nnUNetv2_train 1 {CONF} 0 -tr nnUNetTrainer -p nnUNetPlans -device cpu" in commands
    assert f"nnUNetv2_train 1 {CONF} 0 -tr nnUNetTrainer -p nnUNetResEncUNetMPlans -device cpu" in commands
    assert f"nnUNetv2_train 1 {CONF} 1 -tr nnUNetTrainer_5epochs -p nnUNetPlans -device cpu" in commands
    assert (f"nnUNetv2_train 1 {CONF} 0 -tr {mim.finetune_trainer} -p {mim.plans_name} -device cpu "
            f"-pretrained_weights {nn['w15']}") in commands
    assert len(commands) == 2 * len(arms)
    assert snapshot(nn["tmp"]) == before  # a dry run writes nothing


def test_arms_run_in_their_own_results_folders(nn):
    """Injected runner: each arm's fold lands in TRAINER__<its plans>__CONFIG, found again as finished."""
    calls = []

    def runner(cmd, env, log):
        calls.append((cmd[cmd.index("-tr") + 1], cmd[cmd.index("-p") + 1]))
        d = nn["res"] / DS / f"{calls[-1][0]}__{calls[-1][1]}__{CONF}" / f"fold_{cmd[3]}" / "validation"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.5}, "mean": {"1": {"Dice": 0.5}}}))
        return 0

    spec = F.build_spec("1", CONF, HYSPARK_PLANS, ["nnunet=nnUNetTrainer@nnUNetPlans", "scratch=nnUNetTrainer"],
                        folds=[0])
    assert F.run_benchmark(spec, runner=runner, out=io.StringIO()) == 0
    assert calls == [("nnUNetTrainer", "nnUNetPlans"), ("nnUNetTrainer", HYSPARK_PLANS)]
    assert [j.state for j in F.plan_jobs(spec)] == [F.FINISHED, F.FINISHED]


def test_weights_checked_against_the_arms_own_plans(nn):
    """The 3 mm weights fit nnUNetPlans (3 mm) and not the arm's plans (1.5 mm), whatever -p is."""
    with pytest.raises(HySparKError, match=r"arm 'h' .*spacing: \[3.0, 3.0, 3.0\] mm \(pre-training\) vs "
                                           r"\[1.5, 1.5, 1.5\] mm"):
        F.build_spec("1", CONF, "nnUNetPlans", [f"h={HY_FT}@{HYSPARK_PLANS}:{nn['w30']}"], folds=[0])
    spec = F.build_spec("1", CONF, "nnUNetPlans", [f"h={HY_FT}@{HYSPARK_PLANS}:{nn['w15']}"], folds=[0])
    assert spec.arm_plans(spec.arms[0]) == HYSPARK_PLANS


# ------------------------------------------------------------------- bad arms: exit 2, one line, nothing written

@pytest.mark.parametrize("arms, message", [
    (["a=nnUNetTrainer@nnUNetResEncUNetLPlans"],
     "error: arm 'a': plans file not found: {pre}/Dataset001_Toy/nnUNetResEncUNetLPlans.json -> run "
     "`nnUNetv2_plan_and_preprocess -d 1 -pl nnUNetPlannerResEncL` first"),
    (["a=nnUNetTrainer@nnUNetPlans", "a=nnUNetTrainerHySparK"],
     "error: two arms share the label 'a' -> give every arm its own LABEL"),
    (["a=nnUNetTrainer_5epoch@nnUNetPlans"],
     "error: trainer nnUNetTrainer_5epoch not found by nnU-Net (arm 'a'; searched nnunetv2.training.nnUNetTrainer "
     "and nnUNet_extTrainer="),
    ([f"h={HY_FT}@{HYSPARK_PLANS}:{{w30}}"],
     "error: arm 'h' ({w30}): pre-training and nnUNetHySparKPlans 3d_fullres of Dataset001_Toy are preprocessed "
     "differently: spacing: [3.0, 3.0, 3.0] mm (pre-training) vs [1.5, 1.5, 1.5] mm"),
])
def test_bad_arms_end_before_training(nn, capsys, arms, message):
    arms = [a.format(w30=nn["w30"]) for a in arms]
    before = snapshot(nn["tmp"])
    status, out, err = cli(folds_args(*arms), capsys)
    assert status == 2
    assert err.startswith(message.format(pre=nn["pre"], w30=nn["w30"])), err
    assert err.count("\n") == 1 and " -> " in err
    assert snapshot(nn["tmp"]) == before  # no splits_final.json, manifest, log or results folder


def test_unknown_trainer_suggests_close_names(nn, capsys):
    status, _, err = cli(folds_args("a=nnUNetTrainer_5epoch@nnUNetPlans"), capsys)
    assert status == 2 and "did you mean nnUNetTrainer_5epochs" in err


def test_configuration_or_preprocessed_folder_missing(nn, capsys):
    plans = nn["pre"] / DS / "nnUNetPlans.json"
    data = json.loads(plans.read_text())
    data["configurations"] = {"2d": data["configurations"][CONF]}
    plans.write_text(json.dumps(data))
    status, _, err = cli(folds_args("a=nnUNetTrainer@nnUNetPlans"), capsys)
    assert status == 2 and "error: arm 'a': configuration '3d_fullres' not in nnUNetPlans.json" in err
    assert "run `nnUNetv2_plan_and_preprocess -d 1` first" in err

    folder = nn["pre"] / DS / f"nnUNetResEncUNetMPlans_{CONF}"
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    status, _, err = cli(folds_args("a=nnUNetTrainer@nnUNetResEncUNetMPlans"), capsys)
    assert status == 2
    assert (f"error: arm 'a': preprocessed folder {folder} does not exist (not preprocessed) -> (re)run: "
            f"nnUNetv2_preprocess -d 1 -plans_name nnUNetResEncUNetMPlans -c {CONF}") in err


def set_network(pre: Path, plans: str, network: str) -> None:
    path = pre / DS / f"{plans}.json"
    data = json.loads(path.read_text())
    data["configurations"][CONF]["architecture"] = {"network_class_name": network, "arch_kwargs": {},
                                                     "_kw_requires_import": []}
    path.write_text(json.dumps(data))


def test_finetune_trainer_needs_plans_of_its_network(nn, capsys):
    set_network(nn["pre"], "nnUNetPlans", "dynamic_network_architectures.architectures.unet.PlainConvUNet")
    set_network(nn["pre"], HYSPARK_PLANS, get_method("hyspark").network.class_names[0])
    before = snapshot(nn["tmp"])
    status, _, err = cli(folds_args(f"h={HY_FT}@nnUNetPlans:{nn['w30']}"), capsys)
    assert status == 2 and snapshot(nn["tmp"]) == before
    assert err.startswith(f"error: arm 'h': nnUNetPlans builds PlainConvUNet, but {HY_FT} fine-tunes HySparK -> "
                          f"use {HY_FT}@{HYSPARK_PLANS} (written by `hyspark_plan_and_preprocess -d 1`)"), err
    status, _, err = cli([*folds_args(f"h={HY_FT}@{HYSPARK_PLANS}:{nn['w15']}"), "--dry-run"], capsys)
    assert status == 0, err


def test_p_plans_need_not_exist_when_every_arm_names_its_own(nn, capsys):
    status, _, err = cli(["folds", "-d", "1", "-p", "NoSuchPlans", "-f", "0", "--dry-run", "--arms",
                          "nnunet=nnUNetTrainer@nnUNetPlans"], capsys)
    assert status == 0, err
    status, _, err = cli(["folds", "-d", "1", "-p", "NoSuchPlans", "-f", "0", "--dry-run", "--arms",
                          "nnunet=nnUNetTrainer@nnUNetPlans", "other=nnUNetTrainerHySparK"], capsys)
    assert status == 2 and "error: arm 'other': plans file not found" in err


def test_trainer_lookup_is_nnunets_own(nn):
    """The class nnUNetv2_train would use, from nnU-Net's tree or our folder on nnUNet_extTrainer."""
    from nnunet_hyspark import nnunet_compat as compat

    ext = compat.ext_trainer_value(None)
    assert arm_checks.find_trainer_class("nnUNetTrainer_1epoch", ext).__module__.startswith("nnunetv2.training")
    assert arm_checks.find_trainer_class(HY_FT, ext).__name__ == HY_FT
    assert arm_checks.find_trainer_class("NoSuchTrainer", ext) is None
    assert arm_checks.find_trainer_class(HY_FT, "") is None  # ours only via nnUNet_extTrainer, as for nnU-Net


def test_check_plans_kept_for_callers(nn):
    assert spec_mod.check_plans(DS, "nnUNetPlans", CONF) == nn["pre"] / DS / "nnUNetPlans.json"
