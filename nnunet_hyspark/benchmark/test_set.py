"""Held-out test evaluation: each arm's ensemble of all its folds predicts the test images, nnU-Net scores them.

``hyspark_benchmark folds --test-images DIR --test-labels DIR``: after the folds, every arm whose
benchmark folds all finished is run as ``nnUNetv2_predict -f F1 F2 ...`` (nnU-Net's own ensemble of the
folds' ``checkpoint_final.pth``, in a subprocess with the training environment) into
``OUTPUT/test_set/<arm>/predictions``, then scored in-process by nnU-Net's own
``compute_metrics_on_folder`` (labels or regions from dataset.json, reader/writer from the arm's plans)
into ``OUTPUT/test_set/<arm>/summary.json`` (nnU-Net's format). An arm with a missing fold is reported
("not ensembled: folds 1, 3 missing"), never ensembled from fewer folds. With label-efficiency
fractions, each fraction's folds are one ensemble (``OUTPUT/test_set/<arm>/fraction_<f>``).

Resume: ``test_set.json`` beside the summary records what it was computed from (folders, cases, folds
and their checkpoints' modification times) and is written last; a re-run with the same record skips the
arm, anything else predicts again from scratch. The inputs are checked before any training
(:func:`check_test_set`), so a typo costs seconds. The summary's table: :mod:`.test_set_tables`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nnunet_hyspark.benchmark.running import FINISHED, Runner, subprocess_runner, training_env, training_state
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.io import atomic_json_save

if TYPE_CHECKING:
    from nnunet_hyspark.benchmark.arms import Arm
    from nnunet_hyspark.benchmark.spec import BenchmarkSpec

PREDICT_EXECUTABLE = "nnUNetv2_predict"
TEST_SET_DIR = "test_set"
RECORD = "test_set.json"
SUMMARY = "summary.json"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class TestSet:
    """Checked test inputs: the two folders, the case ids (sorted) and the dataset's file ending."""

    __test__ = False  # not a pytest class

    images: Path
    labels: Path
    cases: tuple[str, ...]
    file_ending: str


@dataclass(frozen=True)
class EnsembleGroup:
    """One ensemble: an arm (at one label fraction) and the nnU-Net folds it averages."""

    arm: "Arm"
    fraction: float | None
    cv_folds: tuple[int, ...]  # the benchmark's folds, for messages
    nnunet_folds: tuple[int, ...]  # the fold indices nnU-Net trained (the -f of nnUNetv2_predict)

    @property
    def name(self) -> str:
        return self.arm.label if self.fraction is None else f"{self.arm.label}/fraction_{self.fraction:g}"


# --------------------------------------------------------------------------- input checks

def check_test_set(images: str | None, labels: str | None, dataset_json: dict) -> TestSet | None:
    """Both folders or neither; nnU-Net image names with the dataset's channels; one label per case, no extra."""
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        raise HySparKError("--test-images and --test-labels go together", "pass both folders, or neither")
    file_ending = str(dataset_json.get("file_ending", ".nii.gz"))
    n_channels = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": ""})
    img_dir, lab_dir = Path(images), Path(labels)
    for folder, flag in ((img_dir, "--test-images"), (lab_dir, "--test-labels")):
        if not folder.is_dir():
            raise HySparKError(f"{flag} {folder} is not a folder", "give the folder holding the test files")
    cases = _image_cases(img_dir, file_ending, n_channels)
    _check_labels(lab_dir, cases, file_ending)
    return TestSet(img_dir.resolve(), lab_dir.resolve(), tuple(sorted(cases)), file_ending)


def resolve_test_set(spec: "BenchmarkSpec", images: str | None, labels: str | None) -> TestSet | None:
    """:func:`check_test_set` against the benchmark dataset's dataset.json (channels, file ending)."""
    if images is None and labels is None:
        return None
    from nnunet_hyspark.benchmark.splits import load_dataset_json

    return check_test_set(images, labels, load_dataset_json(spec.dataset))


def _visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _examples(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _image_cases(folder: Path, file_ending: str, n_channels: int) -> dict[str, set[int]]:
    """Case id -> channels, refusing names nnUNetv2_predict would misread or skip."""
    names = _visible_files(folder)
    ours = [n for n in names if n.endswith(file_ending)]
    expected = f"CASE_0000{file_ending}" + (f" ... CASE_{n_channels - 1:04d}{file_ending}" if n_channels > 1 else "")
    if not ours:
        found = f" (found e.g. {_examples(names)})" if names else " (it is empty)"
        raise HySparKError(f"--test-images {folder} holds no {file_ending} images{found}",
                           f"name the images as nnU-Net does: {expected}")
    cases: dict[str, set[int]] = {}
    bad = []
    for n in ours:
        m = _CHANNEL.match(n[: -len(file_ending)])
        if not m:
            bad.append(n)
            continue
        cases.setdefault(m["case"], set()).add(int(m["channel"]))
    if bad:
        raise HySparKError(f"--test-images {folder}: {len(bad)} file(s) not named CASE_XXXX{file_ending} "
                           f"({_examples(bad)})", f"name the images as nnU-Net does: {expected}")
    wrong = [c for c, ch in sorted(cases.items()) if ch != set(range(n_channels))]
    if wrong:
        have = sorted(cases[wrong[0]])
        raise HySparKError(f"--test-images {folder}: {len(wrong)} case(s) without exactly the dataset's "
                           f"{n_channels} channel(s) (e.g. {wrong[0]} has channels {have})",
                           f"every case needs {expected}")
    return cases


def _check_labels(folder: Path, cases: dict[str, set[int]], file_ending: str) -> None:
    labels = {n[: -len(file_ending)] for n in _visible_files(folder) if n.endswith(file_ending)}
    missing = sorted(set(cases) - labels)
    extra = sorted(labels - set(cases))
    if missing:
        raise HySparKError(f"--test-labels {folder}: {len(missing)} of {len(cases)} test case(s) have no label "
                           f"({_examples([m + file_ending for m in missing])})",
                           f"give each image CASE_0000{file_ending} a label CASE{file_ending}")
    if extra:
        raise HySparKError(f"--test-labels {folder}: {len(extra)} label(s) without a test image "
                           f"({_examples([e + file_ending for e in extra])})",
                           "remove them, or add their images to --test-images")


# --------------------------------------------------------------------------- ensembles

def ensemble_groups(spec: "BenchmarkSpec") -> list[EnsembleGroup]:
    """Per arm (and per label fraction, if any) the nnU-Net folds of one ensemble."""
    from nnunet_hyspark.benchmark.fractions import DEFAULT_FRACTIONS

    # label-efficiency runs (--train-fractions): one ensemble per fraction, of that fraction's nnU-Net folds
    entries = spec.fold_entries if tuple(spec.fractions) != DEFAULT_FRACTIONS else None
    groups = []
    for arm in spec.arms:
        if not entries:
            groups.append(EnsembleGroup(arm, None, tuple(spec.folds), tuple(spec.folds)))
            continue
        for fraction in sorted({e.fraction for e in entries}):
            mine = sorted((e for e in entries if e.fraction == fraction), key=lambda e: e.cv_fold)
            groups.append(EnsembleGroup(arm, fraction, tuple(e.cv_fold for e in mine),
                                        tuple(e.nnunet_fold for e in mine)))
    return groups


def missing_folds(spec: "BenchmarkSpec", group: EnsembleGroup) -> list[int]:
    """The group's benchmark folds whose training has not finished (they block the ensemble)."""
    return [cv for cv, f in zip(group.cv_folds, group.nnunet_folds)
            if training_state(spec.fold_dir(group.arm, f)) != FINISHED
            or not (spec.fold_dir(group.arm, f) / "checkpoint_final.pth").is_file()]


def group_dir(spec: "BenchmarkSpec", group: EnsembleGroup) -> Path:
    return spec.output_dir / TEST_SET_DIR / group.name


def predict_command(spec: "BenchmarkSpec", group: EnsembleGroup, test_set: TestSet) -> list[str]:
    """``nnUNetv2_predict`` of the group's folds (nnU-Net averages their softmax outputs)."""
    cmd = [PREDICT_EXECUTABLE, "-i", str(test_set.images), "-o", str(group_dir(spec, group) / "predictions"),
           "-d", spec.dataset_arg, "-c", spec.configuration, "-tr", group.arm.trainer,
           "-p", spec.arm_plans(group.arm), "-f", *map(str, group.nnunet_folds), "-chk", "checkpoint_final.pth",
           "--disable_progress_bar"]
    if spec.device:
        cmd += ["-device", spec.device]
    return cmd


def _record(spec: "BenchmarkSpec", group: EnsembleGroup, test_set: TestSet) -> dict:
    """What a finished prediction + summary was computed from; any change means predicting again."""
    checkpoints = {str(f): (spec.fold_dir(group.arm, f) / "checkpoint_final.pth").stat().st_mtime_ns
                   for f in group.nnunet_folds}
    return {"images": str(test_set.images), "labels": str(test_set.labels), "cases": list(test_set.cases),
            "trainer": group.arm.trainer, "plans": spec.arm_plans(group.arm), "configuration": spec.configuration,
            "fraction": group.fraction, "folds": list(group.cv_folds), "nnunet_folds": list(group.nnunet_folds),
            "checkpoints_mtime_ns": checkpoints}


def is_done(spec: "BenchmarkSpec", group: EnsembleGroup, test_set: TestSet) -> bool:
    """Finished earlier from the same inputs and checkpoints (the record is written last)."""
    folder = group_dir(spec, group)
    try:
        return (folder / SUMMARY).is_file() and json.loads((folder / RECORD).read_text()) == \
            _record(spec, group, test_set)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- running

def find_predict_executable(env: dict[str, str]) -> str:
    """nnUNetv2_predict from PATH, else next to this Python (a venv that is not activated)."""
    beside = Path(sys.executable).parent / PREDICT_EXECUTABLE
    found = shutil.which(PREDICT_EXECUTABLE, path=env.get("PATH")) or \
        (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)
    if not found:
        raise HySparKError(f"{PREDICT_EXECUTABLE} not found on PATH", "activate the environment where nnunetv2 "
                                                                       "is installed")
    return found


def describe_test_set(spec: "BenchmarkSpec", test_set: TestSet) -> list[str]:
    """Dry-run lines: what happens to each ensemble."""
    lines = []
    for g in ensemble_groups(spec):
        missing = missing_folds(spec, g)
        if missing:
            lines.append(f"# test set {g.name}: {not_ensembled(missing)} (not finished yet)")
        elif is_done(spec, g, test_set):
            lines.append(f"# test set {g.name}: predicted and scored, skipped")
        else:
            lines.append(f"{shlex.join(predict_command(spec, g, test_set))}   # test set {g.name}, "
                         f"{len(test_set.cases)} case(s), scored against {test_set.labels}")
    return lines


def _join(values) -> str:
    return ", ".join(map(str, values))


def not_ensembled(missing: list[int]) -> str:
    """Why an arm has no test-set scores: 'not ensembled: folds 1, 3 missing'."""
    return f"not ensembled: fold{'s' if len(missing) > 1 else ''} {_join(missing)} missing"


def run_test_set(spec: "BenchmarkSpec", test_set: TestSet, runner: Runner | None, out: TextIO,
                 base_env: dict[str, str] | None = None, gpu: str | None = None) -> int:
    """Predict and score every complete ensemble not done yet; returns the number that failed."""
    env = training_env(base_env, gpu)
    failed = 0
    for g in ensemble_groups(spec):
        missing = missing_folds(spec, g)
        if missing:
            print(f"test set: {g.name} {not_ensembled(missing)}", file=out)
            continue
        if is_done(spec, g, test_set):
            print(f"test set: {g.name} already predicted and scored, skipped", file=out)
            continue
        runner = runner or subprocess_runner(find_predict_executable(env))
        failed += not _predict_and_score(spec, g, test_set, runner, env, out)
    return failed


def _predict_and_score(spec: "BenchmarkSpec", g: EnsembleGroup, test_set: TestSet, runner: Runner,
                       env: dict[str, str], out: TextIO) -> bool:
    folder = group_dir(spec, g)
    for stale in (folder / RECORD, folder / SUMMARY):
        stale.unlink(missing_ok=True)
    shutil.rmtree(folder / "predictions", ignore_errors=True)  # leftovers of other cases would be scored too
    folder.mkdir(parents=True, exist_ok=True)
    log = spec.output_dir / "logs" / f"test_set_{g.name.replace('/', '_')}.log"
    print(f"test set: predicting {len(test_set.cases)} case(s) with {g.name} (folds {_join(g.cv_folds)}; "
          f"log: {log})", file=out, flush=True)
    try:
        rc = runner(predict_command(spec, g, test_set), env, log)
    except OSError as e:
        print(f"test set: {g.name} could not start {PREDICT_EXECUTABLE}: {e}", file=out)
        return False
    missing = [c for c in test_set.cases if not (folder / "predictions" / f"{c}{test_set.file_ending}").is_file()]
    if rc != 0 or missing:
        why = f"exit code {rc}" if rc != 0 else f"no prediction for {len(missing)} case(s), e.g. {missing[0]}"
        print(f"FAILED: test set {g.name} ({why}); log: {log}", file=out)
        return False
    try:
        evaluate(spec, g, test_set, folder / SUMMARY)
    except Exception as e:  # nnU-Net's evaluation asserts/raises on unreadable or mismatching images: one arm fails
        print(f"FAILED: test set {g.name}: nnU-Net's evaluation of {folder / 'predictions'} against "
              f"{test_set.labels} failed ({type(e).__name__}: {str(e).strip()[:200]})", file=out)
        return False
    atomic_json_save(_record(spec, g, test_set), folder / RECORD)
    print(f"test set: {g.name} scored: {folder / SUMMARY}", file=out)
    return True


def evaluate(spec: "BenchmarkSpec", group: EnsembleGroup, test_set: TestSet, output_file: Path) -> dict:
    """nnU-Net's own evaluation of the predictions against the labels (labels/regions and ignore label from
    dataset.json, image reader from the arm's plans), written as nnU-Net's summary.json."""
    from nnunet_hyspark import nnunet_compat as compat
    from nnunet_hyspark.benchmark.splits import load_dataset_json
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.configuration import default_num_processes

    dataset_json = load_dataset_json(spec.dataset)
    pm = compat.load_plans_manager(spec.dataset, spec.arm_plans(group.arm))
    lm = pm.get_label_manager(dataset_json)
    tmp = output_file.with_name(f".{output_file.stem}.{os.getpid()}.tmp.json")
    result = compute_metrics_on_folder(str(test_set.labels), str(output_file.parent / "predictions"), str(tmp),
                                       pm.image_reader_writer_class(), test_set.file_ending,
                                       lm.foreground_regions if lm.has_regions else lm.foreground_labels,
                                       lm.ignore_label, num_processes=max(1, min(default_num_processes,
                                                                                 len(test_set.cases))),
                                       chill=False)
    os.replace(tmp, output_file)
    return result
