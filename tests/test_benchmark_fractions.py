"""Label efficiency (``hyspark_benchmark folds --train-fractions``) on a hand-made nnU-Net tree, no training.

Training is an injected runner that writes nnU-Net's ``validation/summary.json`` for the fold it is
asked to train, with a Dice that encodes the nnU-Net fold, so every table cell can be traced back.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from nnunet_hyspark.benchmark import folds as F
from nnunet_hyspark.benchmark import fractions as FR
from nnunet_hyspark.errors import HySparKError
from fakes import run_benchmark_cli as cli
from fakes import write_fake_nnunet_tree

DS = "Dataset001_Toy"
PLANS, NNU_PLANS = "nnUNetHySparKPlans", "nnUNetPlans"
CONF = "3d_fullres"
SCRATCH = F.DEFAULT_SCRATCH_TRAINER
CASES = [f"case_{i:03d}" for i in range(10)]
ARMS = [f"scratch={SCRATCH}", f"nnunet=nnUNetTrainer@{NNU_PLANS}"]
TWO_FOLDS = "".join(f"{c} {i % 2}\n" for i, c in enumerate(CASES))  # 5 train / 5 val cases per fold


@pytest.fixture
def nn(tmp_path, monkeypatch):
    """Raw + preprocessed dataset with two plans (both preprocessed), a results folder, the env vars."""
    plans = {name: {"plans_name": name, "configurations": {CONF: {}}} for name in (PLANS, NNU_PLANS)}
    tree = write_fake_nnunet_tree(tmp_path, DS, CASES, plans, CONF, monkeypatch)
    pre, res = tree["pre"], tree["res"]
    splits = tmp_path / "folds.txt"
    splits.write_text(TWO_FOLDS)
    return {"pre": pre / DS, "res": res, "tmp": tmp_path, "splits": splits}


def dice_of(nnunet_fold: int) -> float:
    return 0.5 + 0.03 * nnunet_fold


def fold_dir(res: Path, trainer: str, plans: str, fold: int) -> Path:
    return res / DS / f"{trainer}__{plans}__{CONF}" / f"fold_{fold}"


class FakeTrainer:
    """Injected runner: 'trains' nnU-Net fold -f of the command's trainer and plans, or fails for chosen ones."""

    def __init__(self, res: Path, fail: set = frozenset()):
        self.res, self.fail, self.calls = res, set(fail), []

    def __call__(self, cmd: list[str], env: dict, log: Path) -> int:
        fold, trainer, plans = int(cmd[3]), cmd[cmd.index("-tr") + 1], cmd[cmd.index("-p") + 1]
        self.calls.append((trainer, plans, fold, "--c" in cmd))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(cmd))
        d = fold_dir(self.res, trainer, plans, fold)
        d.mkdir(parents=True, exist_ok=True)
        (d / "checkpoint_latest.pth").write_bytes(b"")
        if (trainer, fold) in self.fail:
            return 1
        (d / "validation").mkdir(exist_ok=True)
        dice = dice_of(fold) + (0.1 if trainer == SCRATCH else 0.0)
        (d / "validation" / "summary.json").write_text(json.dumps({
            "foreground_mean": {"Dice": dice}, "mean": {"1": {"Dice": dice}, "2": {"Dice": dice / 2}}}))
        return 0


def spec_for(nn, fractions=(0.5, 1.0), output=None, splits=True, folds=None):
    return F.build_spec("1", CONF, PLANS, ARMS, folds=folds, splits_file=str(nn["splits"]) if splits else None,
                        output=output, train_fractions=fractions)


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# --------------------------------------------------------------------------- subsets

def test_subsets_nested_seeded_within_train():
    train = [f"c{i:02d}" for i in range(20)]
    subsets = FR.nested_subsets(list(reversed(train)), (0.1, 0.25, 0.5, 1.0), cv_fold=3)
    assert [len(subsets[f]) for f in (0.1, 0.25, 0.5, 1.0)] == [2, 5, 10, 20]
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[1.0]) == set(train)
    assert subsets == FR.nested_subsets(train, (0.1, 0.25, 0.5, 1.0), cv_fold=3)  # same seed: same cases
    assert FR.nested_subsets(train, (0.5,), cv_fold=4)[0.5] != subsets[0.5]  # one permutation per fold
    assert FR.nested_subsets(train, (0.5,), cv_fold=3, seed=1)[0.5] != subsets[0.5]
    assert FR.nested_subsets(["a", "b", "c"], (0.01,), 0)[0.01] != []  # at least one case
    assert [FR.subset_size(f, 5) for f in (0.01, 0.1, 0.3, 0.5, 0.9, 1.0)] == [1, 1, 2, 3, 5, 5]
    with pytest.raises(HySparKError, match="fold 2 has no training case"):
        FR.nested_subsets([], (0.5,), 2)


@pytest.mark.parametrize("given, message", [
    ((0.0, 1.0), "0 outside (0, 1]"), ((1.5,), "1.5 outside"), ((-0.25, 0.5), "-0.25 outside"),
    ((math.nan,), "nan outside"), ((0.5, 1.0, 0.5), "0.5 listed twice"),
])
def test_bad_fractions_refused(given, message):
    with pytest.raises(HySparKError) as e:
        FR.check_fractions(given)
    assert message in e.value.args[0] and "(0, 1]" in e.value.hint


def test_check_fractions_sorts_and_defaults():
    assert FR.check_fractions(None) == FR.check_fractions([]) == (1.0,)
    assert FR.check_fractions([1.0, 0.1, 0.5]) == (0.1, 0.5, 1.0)


def test_entries_appended_after_the_folds_idempotently():
    base = [{"train": ["a", "b", "c", "d"], "val": ["e", "f"]}, {"train": ["c", "d", "e", "f"], "val": ["a", "b"]}]
    entries, grown = FR.plan_entries(base, [0, 1], (0.25, 0.5, 1.0))
    assert grown[:2] == base and len(grown) == 6 and FR.base_count(grown) == 2
    assert FR.base_splits(grown) == base
    by_key = {(e.cv_fold, e.fraction): e.nnunet_fold for e in entries}
    assert by_key == {(0, 0.25): 2, (0, 0.5): 3, (0, 1.0): 0, (1, 0.25): 4, (1, 0.5): 5, (1, 1.0): 1}
    for e in entries:
        entry = grown[e.nnunet_fold]
        assert entry["val"] == base[e.cv_fold]["val"]  # every fraction scored on the fold's own cases
        assert set(entry["train"]) <= set(base[e.cv_fold]["train"])
    assert set(grown[2]["train"]) < set(grown[3]["train"])
    # idempotent: a re-run finds every entry, a new fraction only appends its own
    assert FR.plan_entries(grown, [0, 1], (0.25, 0.5, 1.0)) == (entries, grown)
    more, grown2 = FR.plan_entries(grown, [1], (0.1, 0.5))
    assert grown2[:6] == grown and [(e.fraction, e.nnunet_fold) for e in more] == [(0.1, 6), (0.5, 5)]
    # other cross-validation folds: new entries, the old ones are left as they are (never reused)
    other = [{"train": ["a", "b", "e", "f"], "val": ["c", "d"]}] + base[1:]
    moved, grown3 = FR.plan_entries(other + grown[2:], [0], (0.5,))
    assert moved[0].nnunet_fold == 6 and grown3[:6] == other + grown[2:]
    assert FR.find_entries(grown, [0, 1], (0.5, 1.0)) == [e for e in entries if e.fraction != 0.25]
    assert FR.find_entries(base, [0], (0.5,)) == []


# --------------------------------------------------------------------------- running

def test_fraction_runs_train_the_entries_and_resume(nn):
    spec = spec_for(nn)
    fake = FakeTrainer(nn["res"], fail={("nnUNetTrainer", 3)})
    out = io.StringIO()
    assert F.run_benchmark(spec, runner=fake, out=out) == 1
    installed = json.loads((nn["pre"] / "splits_final.json").read_text())
    assert len(installed) == 4 and FR.base_splits(installed) == spec.splits  # folds 0, 1 untouched
    for k in (0, 1):
        sub = installed[2 + k]
        assert sub["val"] == installed[k]["val"] and set(sub["train"]) < set(installed[k]["train"])
        assert len(sub["train"]) == 3 and sub[FR.MARKER] == {"fold": k, "fraction": 0.5, "seed": FR.SUBSET_SEED}
    # fold-major, fraction, arm; each arm with its own plans; -f is the entry
    assert [c[:3] for c in fake.calls] == [(SCRATCH, PLANS, 2), ("nnUNetTrainer", NNU_PLANS, 2),
                                           (SCRATCH, PLANS, 0), ("nnUNetTrainer", NNU_PLANS, 0),
                                           (SCRATCH, PLANS, 3), ("nnUNetTrainer", NNU_PLANS, 3),
                                           (SCRATCH, PLANS, 1), ("nnUNetTrainer", NNU_PLANS, 1)]
    text = out.getvalue()
    assert "FAILED: arm nnunet fold 1 fraction 0.5 (nnU-Net fold 3) (exit code 1)" in text
    manifest = json.loads((spec.output_dir / F.MANIFEST_NAME).read_text())
    assert manifest["config"]["fractions"] == [0.5, 1.0]
    assert {(e["fold"], e["fraction"]): e["nnunet_fold"] for e in manifest["fraction_entries"]} == \
        {(0, 0.5): 2, (0, 1.0): 0, (1, 0.5): 3, (1, 1.0): 1}
    assert manifest["folds"]["nnunet"]["3"]["status"] == "failed"
    assert manifest["folds"]["nnunet"]["3"]["cv_fold"] == 1 and manifest["folds"]["nnunet"]["3"]["fraction"] == 0.5
    assert (spec.output_dir / "logs" / "scratch_fold1_frac0.5.log").read_text().split()[3] == "3"
    assert (spec.output_dir / "logs" / "nnunet_fold0_frac1.log").is_file()

    again = spec_for(nn)
    fake2 = FakeTrainer(nn["res"])
    assert F.run_benchmark(again, runner=fake2, out=io.StringIO()) == 0
    assert fake2.calls == [("nnUNetTrainer", NNU_PLANS, 3, True)]  # only the failed one, resumed
    assert json.loads((nn["pre"] / "splits_final.json").read_text()) == installed  # nothing appended twice
    # without --splits the installed file (with its subset entries) is the same benchmark
    assert F.run_benchmark(spec_for(nn, splits=False), runner=FakeTrainer(nn["res"]), out=io.StringIO()) == 0


def test_summary_per_fraction_from_nnunet_folds(nn, capsys):
    spec = spec_for(nn)
    assert F.run_benchmark(spec, runner=FakeTrainer(nn["res"]), out=io.StringIO()) == 0
    out_dir = spec.output_dir
    rows = read_csv(out_dir / "summary.csv")
    value = {(r["fraction"], r["arm"], r["fold"], r["class"]): float(r["value"]) for r in rows if r["metric"] == "Dice"}
    for (fold, fraction), entry in {(0, "0.5"): 2, (1, "0.5"): 3, (0, "1"): 0, (1, "1"): 1}.items():
        assert value[(fraction, "nnunet", str(fold), "liver")] == pytest.approx(dice_of(entry))
        assert value[(fraction, "scratch", str(fold), "tumor")] == pytest.approx((dice_of(entry) + 0.1) / 2)
    agg = {(r["fraction"], r["arm"], r["class"], r["metric"]): r for r in read_csv(out_dir / "summary_aggregate.csv")}
    a = agg[("0.5", "nnunet", "foreground_mean", "Dice")]
    assert float(a["mean"]) == pytest.approx((dice_of(2) + dice_of(3)) / 2) and a["folds_used"] == "0 1"
    comp = {(r["fraction"], r["class"]): r for r in read_csv(out_dir / "summary_comparison.csv")
            if r["metric"] == "Dice"}
    assert float(comp[("1", "liver")]["mean_diff"]) == pytest.approx(-0.1)  # nnunet - scratch, paired per fraction
    assert int(comp[("0.5", "liver")]["n_pairs"]) == 2
    md = (out_dir / "summary.md").read_text()
    assert "## Training fraction 0.5" in md and "## Training fraction 1" in md
    assert "### Difference nnunet − scratch" in md and "Dice vs. training fraction" in md
    assert f"{(dice_of(2) + dice_of(3)) / 2:.4f} ± {math.sqrt(2 * 0.015 ** 2):.4f} (n=2)" in md  # nnunet liver, 0.5
    for png in ("summary.png", "summary_fractions.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # summarize into a new folder without a manifest: the entries are found in splits_final.json
    other = nn["tmp"] / "elsewhere"
    status, out, _ = cli(["summarize", "-d", "1", "-p", PLANS, "--arms", *ARMS, "-f", "0", "1",
                          "--train-fractions", "1", "0.5", "--output", str(other)], capsys)
    assert status == 0 and (other / "summary.csv").read_text() == (out_dir / "summary.csv").read_text()


def test_dry_run_shows_entries_and_writes_nothing(nn, capsys):
    args = ["folds", "-d", "1", "-p", PLANS, "--arms", *ARMS, "--splits", str(nn["splits"]),
            "--train-fractions", "0.2", "1.0", "--dry-run", "--device", "cpu"]
    status, out, _ = cli(args, capsys)
    assert status == 0
    assert not (nn["pre"] / "splits_final.json").exists() and not (nn["res"] / DS).exists()
    assert "2 would be appended" in out and "fold 1 fraction 0.2: nnU-Net fold 3, 1 of 5 training case(s)" in out
    lines = [line.split("   #") for line in out.splitlines() if line.startswith("nnUNetv2_train")]
    assert [line[0].split()[3] for line in lines] == ["2", "2", "0", "0", "3", "3", "1", "1"]
    assert "scratch fold 1 fraction 0.2 (nnU-Net fold 3) (new)" in lines[4][1]
    # installed by a real run, a dry run finds the same entries and still writes nothing
    F.run_benchmark(spec_for(nn, fractions=(0.2, 1.0)), runner=FakeTrainer(nn["res"]), out=io.StringIO())
    before = (nn["pre"] / "splits_final.json").read_text()
    status, out, _ = cli(args + ["--output", str(nn["tmp"] / "dry")], capsys)
    assert status == 0 and "all already in" in out and "fold 1 fraction 0.2 (nnU-Net fold 3): finished" in out
    assert (nn["pre"] / "splits_final.json").read_text() == before and not (nn["tmp"] / "dry").exists()


def test_other_fractions_are_another_benchmark(nn):
    F.run_benchmark(spec_for(nn), runner=FakeTrainer(nn["res"]), out=io.StringIO())
    with pytest.raises(HySparKError, match=r"different benchmark \(differs in: fractions\)"):
        F.run_benchmark(spec_for(nn, fractions=(0.25, 1.0)), runner=FakeTrainer(nn["res"]), out=io.StringIO())
    with pytest.raises(HySparKError, match="differs in: fractions"):
        F.run_benchmark(spec_for(nn, fractions=None), runner=FakeTrainer(nn["res"]), out=io.StringIO())


@pytest.mark.parametrize("fractions, message", [
    (["0"], "0 outside (0, 1]"), (["1.01"], "1.01 outside (0, 1]"), (["0.5", "0.50"], "0.5 listed twice"),
])
def test_bad_fractions_on_the_command_line(nn, capsys, fractions, message):
    status, _, err = cli(["folds", "-d", "1", "-p", PLANS, "--arms", *ARMS, "--splits", str(nn["splits"]),
                          "--train-fractions", *fractions], capsys)
    assert status == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (nn["pre"] / "splits_final.json").exists() and not (nn["res"] / DS).exists()


def test_fold_without_training_cases_refused(nn, capsys):
    splits = [{"train": [], "val": CASES[:5]}, {"train": CASES[:5], "val": CASES[5:]}]
    (nn["pre"] / "splits_final.json").write_text(json.dumps(splits))
    status, _, err = cli(["folds", "-d", "1", "-p", PLANS, "--arms", *ARMS, "--train-fractions", "0.5", "1"],
                         capsys)
    assert status == 2 and "fold 0 has no training case" in err and err.count("\n") == 1
    assert json.loads((nn["pre"] / "splits_final.json").read_text()) == splits and not (nn["res"] / DS).exists()
