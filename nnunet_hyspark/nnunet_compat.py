"""Everything nnunet-hyspark asks of nnU-Net v2, in one place.

* dataset ids and folder names (``DatasetXXX_Name``), found the way nnU-Net finds them;
* plans: the file, nnU-Net's ``PlansManager`` and ``ConfigurationManager`` (nnU-Net resolves
  ``inherits_from``), a configuration's data folder;
* where nnU-Net looks for trainers (``nnUNet_extTrainer``) and the value that adds ours;
* the torch device a command runs on;
* the one plans-compatibility rule: pre-trained weights, ``--init-from`` and several pre-training
  datasets must share spacing and intensity normalisation, all checked with :data:`PLANS_RTOL`
  and reported in one message style.

nnU-Net itself is imported inside the functions, so that commands answer ``--help`` quickly.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from nnunet_hyspark.errors import NNUNET_ENV_VARS, HySparKError, require_nnunet_env

if TYPE_CHECKING:  # typing only: importing nnU-Net / torch is slow
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

__all__ = ["NNUNET_ENV_VARS", "require_nnunet_env", "dataset_name", "dataset_id", "preprocessed_dir", "plans_file",
           "plan_hint", "load_plans_manager", "check_configuration", "configuration", "configuration_dict", "data_identifier",
           "TRAINER_LOOKUP_PACKAGE", "our_trainer_folder", "ext_trainer_value",
           "resolve_device", "PLANS_RTOL", "ALLOW_MISMATCH_ENV", "Preprocessing", "plans_compatibility_problems",
           "check_plans_compatible", "check_weights_fit_plans"]

DEFAULT_PLANS = "nnUNetHySparKPlans"  # the plans name hyspark_plan_and_preprocess writes without options
_NAME_RE = re.compile(r"^Dataset(\d{3})_")


# ------------------------------------------------------------------------------------------ datasets


def _search_dirs(search_dirs: Sequence[str | os.PathLike] | None) -> list[Path]:
    if search_dirs is not None:
        return [Path(d) for d in search_dirs]
    return [Path(os.environ[n]) for n in NNUNET_ENV_VARS if os.environ.get(n)]


def dataset_name(id_or_name: int | str, search_dirs: Sequence[str | os.PathLike] | None = None,
                 hint: str | None = None) -> str:
    """``DatasetXXX_Name`` for an id (``7``, ``"007"``) or a name (returned as it is, like nnU-Net does).

    An id is looked up as nnU-Net's ``find_candidate_datasets`` does: the ``DatasetXXX_*`` folders in
    ``search_dirs`` (default: ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``, those
    set); none, or two different names for one id, is a HySparKError.
    """
    text = str(id_or_name).strip()
    if text.startswith("Dataset"):
        return text
    if not text.isdigit():
        raise HySparKError(f"dataset {str(id_or_name)!r} is neither an id nor a DatasetXXX_Name folder name",
                           hint or "give the dataset's number (e.g. 1) or its folder name (e.g. Dataset001_Liver)")
    did = int(text)
    dirs = _search_dirs(search_dirs)
    prefix = f"Dataset{did:03d}_"
    names = sorted({p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith(prefix)
                    and p.is_dir()})
    where = " / ".join(str(d) for d in dirs) or "no nnU-Net folder (nnUNet_raw etc. are not set)"
    if not names:
        raise HySparKError(f"dataset {str(id_or_name)!r} not found (no {prefix}* folder in {where})",
                           hint or "check the id (ls $nnUNet_raw $nnUNet_preprocessed), or create the dataset, "
                                   f"e.g. `hyspark_synthesize -d {did}`")
    if len(names) > 1:
        raise HySparKError(f"dataset id {did} is ambiguous: several folders {names} in {where}",
                           "keep one DatasetXXX_* folder per id in nnUNet_raw / nnUNet_preprocessed / "
                           "nnUNet_results (remove or rename the stale one)")
    return names[0]


def dataset_id(id_or_name: int | str, search_dirs: Sequence[str | os.PathLike] | None = None,
               hint: str | None = None) -> int:
    """The number of a dataset given by id or name (nnU-Net's ``convert_dataset_name_to_id``)."""
    name = dataset_name(id_or_name, search_dirs, hint)
    m = _NAME_RE.match(name)
    if m is None:
        raise HySparKError(f"dataset folder name {name!r} does not start with DatasetXXX_",
                           "nnU-Net names datasets DatasetXXX_Name (three digits)")
    return int(m.group(1))


def preprocessed_dir(dataset: int | str, preprocessed: str | os.PathLike | None = None) -> Path:
    """``<nnUNet_preprocessed>/DatasetXXX_Name`` (``preprocessed`` overrides the environment variable)."""
    root = Path(preprocessed) if preprocessed is not None else \
        Path(require_nnunet_env(["nnUNet_preprocessed"])["nnUNet_preprocessed"])
    return root / dataset_name(dataset, [root] if preprocessed is not None else None,
                               hint=plan_hint(dataset))


def plans_file(dataset: int | str, plans: str, preprocessed: str | os.PathLike | None = None) -> Path:
    """The plans JSON of a dataset: ``<nnUNet_preprocessed>/DatasetXXX_Name/<plans>.json``."""
    return preprocessed_dir(dataset, preprocessed) / f"{plans}.json"


def plan_hint(dataset: int | str, configuration: str | None = None, plans: str | None = None) -> str:
    """The command that writes the plans (and data) of ``dataset``."""
    text = str(dataset)
    m = _NAME_RE.match(text)
    ident = str(int(m.group(1))) if m else text
    c = f" -c {configuration}" if configuration and configuration != "3d_fullres" else ""
    p = f" --plans-name {plans}" if plans and plans != DEFAULT_PLANS else ""
    return f"run `hyspark_plan_and_preprocess -d {ident}{c}{p}` first"


def load_plans_manager(dataset: int | str, plans: str, preprocessed: str | os.PathLike | None = None,
                       hint: str | None = None) -> "PlansManager":
    """nnU-Net's PlansManager for a dataset's plans; a one-line error naming the command that writes them."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = plans_file(dataset, plans, preprocessed)
    if not path.is_file():
        raise HySparKError(f"plans file not found: {path}", hint or plan_hint(dataset, plans=plans))
    try:
        return PlansManager(str(path))
    except ValueError as e:  # not JSON
        raise HySparKError(f"plans file {path} is not valid JSON ({e})", hint or plan_hint(dataset, plans=plans))


def check_configuration(pm: "PlansManager", name: str, dataset: int | str, plans: str, hint: str | None) -> None:
    available = list(pm.available_configurations)
    if name not in available:
        raise HySparKError(f"configuration {name!r} not in {plans}.json of {dataset} "
                           f"(available: {', '.join(sorted(available)) or 'none'})",
                           hint or plan_hint(dataset, name, plans))


def configuration(dataset: int | str, plans: str, name: str, preprocessed: str | os.PathLike | None = None,
                  hint: str | None = None) -> "ConfigurationManager":
    """nnU-Net's ConfigurationManager of one configuration (``inherits_from`` resolved by nnU-Net)."""
    pm = load_plans_manager(dataset, plans, preprocessed, hint)
    check_configuration(pm, name, dataset, plans, hint)
    try:
        return pm.get_configuration(name)
    except RuntimeError as e:  # circular inheritance
        raise HySparKError(f"configuration {name!r} of {plans}.json of {dataset}: {e}",
                           hint or plan_hint(dataset, name, plans)) from None


def configuration_dict(pm: "PlansManager", name: str) -> dict[str, Any]:
    """A configuration as a plain dict, ``inherits_from`` resolved by nnU-Net's PlansManager.

    Unlike ``get_configuration`` this works for configurations without an ``architecture`` entry
    (hand-written or foreign plans), where ConfigurationManager would try to convert old plans.
    """
    return pm._internal_resolve_configuration_inheritance(name)  # noqa: SLF001 (nnU-Net's own resolution)


def data_identifier(dataset: int | str, plans: str, name: str, preprocessed: str | os.PathLike | None = None) -> str:
    """The folder of a configuration's preprocessed data; nnU-Net's default ``<plans>_<configuration>`` if the
    plans do not name one."""
    pm = load_plans_manager(dataset, plans, preprocessed)
    check_configuration(pm, name, dataset, plans, None)
    return configuration_dict(pm, name).get("data_identifier", f"{plans}_{name}")


# ------------------------------------------------------------------------------------------ trainers

#: the folder nnU-Net imports trainers from: it only re-exports ours, so they keep one identity
TRAINER_LOOKUP_PACKAGE = "nnunet_hyspark.trainers.nnunet_lookup"


def our_trainer_folder() -> str:
    """The folder to list in ``nnUNet_extTrainer`` (found without importing the trainers, or torch)."""
    for name in (TRAINER_LOOKUP_PACKAGE, "nnunet_hyspark.trainers"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin:
            return os.path.dirname(os.path.abspath(spec.origin))
    raise HySparKError("package nnunet_hyspark.trainers not found", "reinstall nnunet-hyspark")


def ext_trainer_value(existing: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder first and the folders already listed kept (no duplicates)."""
    ours = our_trainer_folder()
    others = [p for p in (existing or "").split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


# ------------------------------------------------------------------------------------------ device


def resolve_device(name: str, check: bool = True) -> "torch.device":
    """``auto`` -> cuda if a GPU is visible, else cpu. ``check``: refuse ``cuda`` without a visible GPU
    (off where the device is only passed on, e.g. to nnUNetv2_train on other machines)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if check and name == "cuda" and not torch.cuda.is_available():
        raise HySparKError("--device cuda requested but no CUDA device is available", "use --device cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ plans compatibility

#: relative tolerance of every number compared (spacing per axis, CT intensity statistics); relative to
#: max(|a|, |b|, 1) so that statistics near 0 are compared absolutely
PLANS_RTOL = 0.02
ALLOW_MISMATCH_ENV = "HYSPARK_ALLOW_PLANS_MISMATCH"
CT_KEYS = ("percentile_00_5", "percentile_99_5", "mean", "std")
WEIGHTS_MISMATCH_HINT = (f"preprocess the pre-training data with this dataset's plans (hyspark_plan_and_preprocess "
                         f"-d PRETRAIN_ID --plans-from THIS_ID), or set {ALLOW_MISMATCH_ENV}=1 to use the weights anyway")


@dataclass(frozen=True)
class Preprocessing:
    """What pre-training and fine-tuning data must share; None = not recorded (not compared)."""

    spacing: tuple[float, ...] | None
    normalization_schemes: tuple[str, ...] | None
    intensity_properties: Mapping[str, Mapping[str, float]] | None  # foreground_intensity_properties_per_channel

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Preprocessing":
        """From a weights file's metadata (written by hyspark_pretrain)."""
        return cls(_tuple(meta.get("spacing"), float), _tuple(meta.get("normalization_schemes"), str),
                   meta.get("foreground_intensity_properties_per_channel"))

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any], configuration: Mapping[str, Any]) -> "Preprocessing":
        """From a plans dict and one of its (resolved) configurations."""
        props = plans.get("foreground_intensity_properties_per_channel",
                          plans.get("foreground_intensity_properties_by_modality"))
        return cls(_tuple(configuration.get("spacing"), float),
                   _tuple(configuration.get("normalization_schemes"), str), props)


def _tuple(values, kind) -> tuple | None:
    return None if values is None else tuple(kind(v) for v in values)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= PLANS_RTOL * max(abs(a), abs(b), 1.0)


def plans_compatibility_problems(a: Preprocessing, b: Preprocessing, a_name: str, b_name: str) -> list[str]:
    """What differs between two preprocessings, one phrase each; empty if they are compatible."""
    problems = []
    if a.spacing is not None and b.spacing is not None and (
            len(a.spacing) != len(b.spacing) or not all(map(_close, a.spacing, b.spacing))):
        problems.append(f"spacing: {list(a.spacing)} mm ({a_name}) vs {list(b.spacing)} mm ({b_name})")
    schemes_a, schemes_b = a.normalization_schemes, b.normalization_schemes
    if schemes_a is not None and schemes_b is not None and schemes_a != schemes_b:
        problems.append(f"normalisation schemes: {list(schemes_a)} ({a_name}) vs {list(schemes_b)} ({b_name})")
    elif schemes_a is not None:
        for c, scheme in enumerate(schemes_a):
            pa = (a.intensity_properties or {}).get(str(c))
            pb = (b.intensity_properties or {}).get(str(c))
            if scheme != "CTNormalization" or not pa or not pb:
                continue
            for key in CT_KEYS:
                va, vb = pa.get(key), pb.get(key)
                if va is not None and vb is not None and not _close(float(va), float(vb)):
                    problems.append(f"CT intensity {key} of channel {c}: {float(va):.1f} ({a_name}) vs "
                                    f"{float(vb):.1f} ({b_name}), so the same HU maps to different network inputs")
    return problems


def check_plans_compatible(a: Preprocessing, b: Preprocessing, a_name: str, b_name: str, hint: str) -> None:
    """Raise the one plans-mismatch HySparKError if ``a`` and ``b`` differ (see :func:`plans_compatibility_problems`)."""
    problems = plans_compatibility_problems(a, b, a_name, b_name)
    if problems:
        raise HySparKError(f"{a_name} and {b_name} are preprocessed differently: {'; '.join(problems)}", hint)


def check_weights_fit_plans(meta: Mapping[str, Any], plans: Preprocessing, plans_name: str,
                            warn: Callable[[str], None]) -> None:
    """Pre-trained weights (their metadata) against the plans they are used with.

    A mismatch is refused, except for converted published checkpoints (``plans_check: warn`` in their
    metadata: pre-trained with their own preprocessing) and with ``HYSPARK_ALLOW_PLANS_MISMATCH=1``,
    where ``warn`` receives the message instead.
    """
    try:
        check_plans_compatible(Preprocessing.from_meta(meta), plans, "pre-training", plans_name,
                               WEIGHTS_MISMATCH_HINT)
    except HySparKError as e:
        if meta.get("plans_check") == "warn" or os.environ.get(ALLOW_MISMATCH_ENV) == "1":
            warn(f"WARNING!!! {e.args[0]}. Continuing (converted published checkpoint, or {ALLOW_MISMATCH_ENV}=1).")
            return
        raise
