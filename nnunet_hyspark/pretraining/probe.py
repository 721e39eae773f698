"""A cheap downstream signal during pre-training: a voxel-wise linear probe on the frozen encoder.

``hyspark_pretrain --probe-dataset L --probe-every N``: every N epochs the encoder's
multi-scale features of a few labelled cases of dataset L feed a linear classifier
(one weight per feature channel and class at every scale, i.e. a 1x1x1 convolution on the
features upsampled to full resolution), trained for a fixed small budget on some cases and
scored (Dice per class) on the others. Cases, crops, initialisation and the optimiser's
steps are fixed, so the numbers are comparable across epochs and across runs: a rising
probe Dice means the encoder's features separate the organs better.

Why it is cheap: the classifier is trained on a fixed, class-balanced sample of voxels
(``points_per_class`` per class and case): each scale's features are interpolated trilinearly
at those voxels once (exactly what upsampling to full resolution gives there), so a training
step is a few small matrix products instead of upsampling every scale to every voxel (60
full-resolution steps took about a minute for the demo's tiny network on 2 cores). Scoring
uses every voxel of the test crops once; there upsampling is linear, so ``W . up(f) ==
up(W . f)`` and only the K-class logits are upsampled, never the (hundreds of channels of)
features. Features are standardised per channel with the training crops' statistics, so one
learning rate suits every encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_hyspark.errors import HySparKError

if TYPE_CHECKING:
    from nnunet_hyspark.methods import MethodSpec

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class ProbeConfig:
    num_train_cases: int = 3
    num_test_cases: int = 2
    steps: int = 60  # full-batch Adam steps of the linear classifier
    points_per_class: int = 1024  # training voxels sampled per class and case
    lr: float = 0.05
    seed: int = 0


@dataclass
class ProbeData:
    """Fixed crops (image, labels) of a labelled preprocessed dataset, split into train and test."""

    train_images: torch.Tensor  # (N, C, *patch) float
    train_labels: torch.Tensor  # (N, *patch) long, -1 = ignore
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]  # index k -> name, background first
    cases: dict[str, list[str]]


def load_probe_data(folder: str | os.PathLike, dataset_json: dict, patch_size: Sequence[int],
                    cfg: ProbeConfig = ProbeConfig()) -> ProbeData:
    """One crop per case, centred on the case's labelled voxels, from nnU-Net's preprocessed folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(folder)
    dataset = infer_dataset_class(folder)(folder)
    identifiers = sorted(dataset.identifiers)
    needed = cfg.num_train_cases + cfg.num_test_cases
    if len(identifiers) < needed:
        raise HySparKError(f"the probe needs {needed} labelled cases, {folder} has {len(identifiers)}",
                           "use a larger --probe-dataset")
    # a fixed, seeded choice of cases: the same in every epoch and every run with this seed
    order = np.random.default_rng(cfg.seed).permutation(len(identifiers))
    chosen = [identifiers[i] for i in order[:needed]]
    images, labels = [], []
    for ident in chosen:
        data, seg, _, _ = dataset.load_case(ident)
        seg = np.asarray(seg)
        if seg.max() <= 0:
            raise HySparKError(f"--probe-dataset case {ident} has no labels", "give a labelled dataset to the probe")
        image, label = _crop_around_labels(np.asarray(data), seg[0], patch_size)
        images.append(torch.from_numpy(image).float())
        labels.append(torch.from_numpy(label).long())
    names = sorted(dataset_json["labels"], key=lambda k: _label_value(dataset_json["labels"][k]))
    n = cfg.num_train_cases
    return ProbeData(torch.stack(images[:n]), torch.stack(labels[:n]), torch.stack(images[n:]),
                     torch.stack(labels[n:]), names, {"train": chosen[:n], "test": chosen[n:]})


def _label_value(v) -> int:
    return int(v if not isinstance(v, (list, tuple)) else v[0])


def _crop_around_labels(data: np.ndarray, seg: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A ``patch`` crop centred on the labelled voxels' bounding box (padded with the image minimum / ignore)."""
    fg = np.argwhere(seg > 0)
    centre = (fg.min(0) + fg.max(0)) // 2
    lo = [int(c - p // 2) for c, p in zip(centre, patch)]
    image = np.full((data.shape[0], *patch), data.min(), dtype=np.float32)
    label = np.full(tuple(patch), -1, dtype=np.int64)
    src, dst = [], []
    for ax, (start, p, n) in enumerate(zip(lo, patch, seg.shape)):
        a, b = max(start, 0), min(start + p, n)
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    image[(slice(None), *dst)] = data[(slice(None), *src)]
    label[tuple(dst)] = seg[tuple(src)]
    label[label < 0] = -1  # nnU-Net marks voxels outside the nonzero mask with -1: ignore them
    return image, label


class LinearProbe(nn.Module):
    """Per-scale 1x1x1 classifiers on standardised features; logits summed at full resolution."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, 1, bias=False) for c in channels)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit_statistics(self, feats: list[torch.Tensor]) -> None:
        self.stats = [(f.mean((0, 2, 3, 4), keepdim=True), f.std((0, 2, 3, 4), keepdim=True) + 1e-5) for f in feats]

    def features_at_points(self, feats: list[torch.Tensor], points: list[torch.Tensor],
                           size: Sequence[int]) -> list[torch.Tensor]:
        """Each scale's standardised features at full-resolution voxels ``points[i]`` (n_i, 3) of case i, by the
        trilinear interpolation ``forward`` upsamples with: (C_s, sum n_i) per scale."""
        out = []
        for f, (mu, sd) in zip(feats, self.stats):
            f = (f - mu) / sd
            out.append(torch.cat([_interpolate_at(f[i:i + 1], p, size) for i, p in enumerate(points)], 1))
        return out

    def point_logits(self, at_points: list[torch.Tensor]) -> torch.Tensor:
        """(N, K) logits of the voxels whose features :meth:`features_at_points` returned."""
        logits = self.bias.view(-1, 1)
        for head, f in zip(self.heads, at_points):
            logits = logits + head.weight.flatten(1) @ f
        return logits.T

    def forward(self, feats: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        logits = self.bias.view(1, -1, 1, 1, 1)
        for head, f, (mu, sd) in zip(self.heads, feats, self.stats):
            low = head((f - mu) / sd)
            logits = logits + F.interpolate(low, size=tuple(size), mode="trilinear", align_corners=False)
        return logits


def _interpolate_at(f: torch.Tensor, points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(f, size, mode="trilinear", align_corners=False)`` read at voxels ``points`` (n, 3) only:
    (C, n). grid_sample with border padding clamps as interpolate does at the edges."""
    sizes = torch.tensor(list(size), dtype=f.dtype)
    normalised = (2 * points.to(f.dtype) + 1) / sizes - 1  # voxel centres in [-1, 1], axis order (d, h, w)
    grid = normalised.flip(-1).view(1, 1, 1, -1, 3)  # grid_sample wants (x, y, z) = (w, h, d)
    return F.grid_sample(f, grid, mode="bilinear", padding_mode="border", align_corners=False).view(f.shape[1], -1)


@torch.no_grad()
def _features(features: FeatureFn, images: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    per_case = [[f.float().cpu() for f in features(images[i:i + 1].to(device))] for i in range(len(images))]
    return [torch.cat(scale) for scale in zip(*per_case)]


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 over all voxels (ignored voxels excluded); NaN for a class absent from both."""
    valid = target >= 0
    out = []
    for k in range(1, num_classes):
        p, t = (pred == k) & valid, (target == k) & valid
        denom = p.sum() + t.sum()
        out.append(2.0 * float((p & t).sum()) / float(denom) if denom > 0 else float("nan"))
    return out


def run_probe(features: FeatureFn, data: ProbeData, device: torch.device,
              cfg: ProbeConfig = ProbeConfig()) -> dict:
    """Train the linear probe on the train crops, score the test crops: {"dice": {class: d}, "mean_dice": m}."""
    train = _features(features, data.train_images, device)
    test = _features(features, data.test_images, device)
    num_classes = len(data.class_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = LinearProbe([f.shape[1] for f in train], num_classes)
    probe.fit_statistics(train)
    points = _sample_points(data.train_labels, cfg.points_per_class, cfg.seed)
    at_points = probe.features_at_points(train, points, data.train_labels.shape[1:])
    labels = torch.cat([lab[tuple(p.T)] for lab, p in zip(data.train_labels, points)])
    weights = _class_weights(labels, num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe.point_logits(at_points), labels, weight=weights)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pred = probe(test, data.test_labels.shape[1:]).argmax(1)
    dice = dict(zip(data.class_names[1:], dice_per_class(pred, data.test_labels, num_classes)))
    scored = [d for d in dice.values() if not np.isnan(d)]
    return {"dice": dice, "mean_dice": float(np.mean(scored)) if scored else float("nan")}


def _sample_points(labels: torch.Tensor, per_class: int, seed: int) -> list[torch.Tensor]:
    """Per case, up to ``per_class`` voxel indices (n, 3) of every class present (ignored voxels never)."""
    gen = torch.Generator().manual_seed(seed)
    points = []
    for lab in labels:
        chosen = []
        for k in torch.unique(lab).tolist():
            if k < 0:
                continue
            where = (lab == k).nonzero()
            chosen.append(where[torch.randperm(len(where), generator=gen)[:per_class]])
        points.append(torch.cat(chosen))
    return points


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, so small organs count in a few dozen steps."""
    counts = torch.bincount(labels[labels >= 0].flatten(), minlength=num_classes).float()
    w = counts.sum() / counts.clamp(min=1) / num_classes
    return w / w.mean()



# ----------------------------------------------------------------- in a pre-training run
@dataclass
class ProbeRunner:
    """The probe of one run: fixed data, the method's feature hook, and how often it runs."""

    data: ProbeData
    features: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]  # MethodSpec.encoder_features
    every: int
    dataset: str  # DatasetXXX_Name, for the log
    cfg: ProbeConfig = ProbeConfig()

    def due(self, epochs_done: int, epochs: int) -> bool:
        """Epoch 0 (the initial encoder), every ``every`` epochs, and the last one."""
        return epochs_done == 0 or epochs_done % self.every == 0 or epochs_done == epochs

    def __call__(self, model: nn.Module, device: torch.device) -> dict:
        was_training = model.training
        model.eval()  # batch statistics of 1-case batches would make the features depend on the batch
        try:
            return run_probe(lambda x: self.features(model, x), self.data, device, self.cfg)
        finally:
            model.train(was_training)


def probe_for_run(dataset: int | str, plans: str, configuration: str, pretraining_dataset: int | str,
                  patch_size: Sequence[int] | None, spec: "MethodSpec", every: int) -> ProbeRunner:
    """``--probe-dataset``: a labelled dataset preprocessed like the (first) pre-training dataset, loaded once;
    crops of ``patch_size`` (None: the plans' patch, the network's input).

    Checked before a run writes anything: the method has a feature hook, the dataset has these plans and
    labels, and its preprocessing passes the plans-compatibility rule against the pre-training data's.
    """
    from nnunet_hyspark import nnunet_compat as compat
    from nnunet_hyspark.pretraining.data.config import PretrainDataConfig
    from nnunet_hyspark.pretraining.data.sources import load_source

    features = spec.encoder_features
    if features is None:
        raise HySparKError(f"--probe-dataset: the {spec.title} method does not expose its encoder's features "
                           f"(MethodSpec.encoder_features)", "leave out --probe-dataset for this method")
    pm = compat.load_plans_manager(pretraining_dataset, plans, hint=compat.plan_hint(pretraining_dataset))
    reference = compat.configuration_dict(pm, configuration)
    pretraining = compat.Preprocessing.from_plans(pm.plans, reference)
    patch_size = tuple(patch_size or reference["patch_size"])
    if every < 1:
        raise HySparKError(f"--probe-every must be at least 1, got {every}", "e.g. --probe-every 5")
    preprocessed = compat.require_nnunet_env(["nnUNet_preprocessed"])["nnUNet_preprocessed"]
    src = load_source(PretrainDataConfig(dataset_ids=[dataset], configuration=configuration,
                                         plans_identifier=plans), preprocessed, dataset)
    if not _has_labels(src.root):
        raise HySparKError(f"--probe-dataset {src.name} has no labels (an image collection)",
                           "give a labelled dataset preprocessed with the pre-training plans")
    compat.check_plans_compatible(
        compat.Preprocessing.from_plans(src.plans, src.config), pretraining, f"--probe-dataset {src.name}",
        "the pre-training data",
        f"preprocess the probe dataset with the pre-training plans (hyspark_plan_and_preprocess -d "
        f"{compat.dataset_id(src.name)} --plans-from PRETRAINING_ID -p {plans}) or probe with another dataset")
    from batchgenerators.utilities.file_and_folder_operations import load_json

    data = load_probe_data(src.folder, load_json(os.path.join(src.root, "dataset.json")), patch_size)
    return ProbeRunner(data, features, every, src.name)


def _has_labels(root: str) -> bool:
    """nnU-Net writes ``gt_segmentations`` when it preprocesses a labelled dataset; image collections
    (preprocessed without labels) have none."""
    gt = os.path.join(root, "gt_segmentations")
    return os.path.isdir(gt) and any(os.scandir(gt))
