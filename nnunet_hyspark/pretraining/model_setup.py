"""The model a pre-training run trains: the network arguments from the plans (which must name the method's
fine-tuning network), the sparse backend, and ``--init-from`` (an encoder from a weights file whose plans fit,
or the whole model from a published checkpoint of the method)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from nnunet_hyspark import nnunet_compat as compat
from nnunet_hyspark.errors import HySparKError
from nnunet_hyspark.methods import MethodSpec, method_for_network

if TYPE_CHECKING:
    import torch
    from torch import nn


def plan_arch_kwargs(dataset: int | str, plans: str, configuration: str, spec: MethodSpec) -> dict:
    """The network arguments of a configuration, which must be the method's fine-tuning network."""
    cm = compat.configuration(dataset, plans, configuration,
                              hint="plan the dataset with hyspark_plan_and_preprocess")
    if method_for_network(cm.network_arch_class_name) is not spec:
        raise HySparKError(f"{compat.plans_file(dataset, plans)} configuration {configuration} uses "
                           f"{cm.network_arch_class_name}, not {spec.network.class_name.rsplit('.', 1)[-1]}",
                           f"plan the dataset with hyspark_plan_and_preprocess --network {spec.name}, then "
                           f"-p {spec.plans_name}")
    return dict(cm.network_arch_init_kwargs)


def resolve_sparse_backend(name: str, device: torch.device) -> Any:
    """The sparse backend object, resolved once for the run (``auto``: by device)."""
    from nnunet_hyspark.sparse import resolve_backend

    try:
        return resolve_backend(name, device)
    except (ValueError, RuntimeError, ImportError) as e:
        raise HySparKError(f"--sparse-backend {name}: {e}") from None


def init_encoder(model: nn.Module, path: str, info: dict, spec: MethodSpec | None = None) -> None:
    """``--init-from``: the encoder's tensors from a weights file whose plans fit this pre-training's, or the
    whole model from a published pre-training checkpoint of the run's method (``spec``)."""
    from nnunet_hyspark.weights import format_report, load_weights_file, transfer_report

    if spec is not None and spec.load_published_pretraining is not None:
        from nnunet_hyspark.methods import method_for_published
        from nnunet_hyspark.safe_load import load_user_file

        obj = load_user_file(path, "weights file")  # our own files are read again below: a rare, one-off cost
        if method_for_published(obj) is spec:
            _init_from_published(model, obj, path, spec)
            return
    weights, meta = load_weights_file(path)
    plans = compat.Preprocessing(tuple(info["spacing"]), tuple(info["normalization_schemes"]),
                                 info.get("foreground_intensity_properties_per_channel"))
    compat.check_weights_fit_plans(meta, plans, "this pre-training's plans", lambda m: print(m, file=sys.stderr))
    enc_state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    report = transfer_report(model.encoder.state_dict(), enc_state)
    # tensors only pre-training has (Hi-End-MAE's class token) are not in fine-tuning files: they stay initialised
    optional = tuple(getattr(model.encoder, "pretraining_only_keys", ()))
    report["missing"] = [k for k in report["missing"] if k not in optional]
    if report["missing"] or report["shape_mismatch"]:
        raise HySparKError(f"--init-from {path} does not fit this encoder: " + "; ".join(format_report(report)[1:3]))
    # tensors only fine-tuning has (MiM's layer-scale) are in report["ignored"]: the pre-training encoder has no place
    model.encoder.load_state_dict({k: v for k, v in enc_state.items() if k not in report["ignored"]},
                                  strict=not optional)


def _init_from_published(model: nn.Module, checkpoint: Any, path: str, spec: MethodSpec) -> None:
    """The whole pre-training model from a published checkpoint, with its key report. Its authors pre-trained
    with their own preprocessing, so (as for converted checkpoints) a mismatch with the plans only warns."""
    print(f"WARNING!!! --init-from {path} is a published {spec.title} checkpoint, pre-trained with its authors' "
          f"preprocessing, not this run's plans. Continuing.", file=sys.stderr)
    report = spec.load_published_pretraining(model, checkpoint)
    print(f"--init-from {path}: published {spec.title} pre-training checkpoint: loaded {len(report['loaded'])} "
          f"tensors, ignored {len(report['ignored'])}, missing {len(report['missing'])}")
    for line in report["ignored"]:
        print(f"  ignored: {line}")
