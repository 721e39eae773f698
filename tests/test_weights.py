"""Weights files: nnU-Net's own loader accepts the export; the published layout converts; checks refuse."""
import json

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_hyspark.cli.convert_checkpoint import main as convert_main
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.methods.hyspark.network import HySparKUNet
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import (plans_compatibility_problems,
                                                                   pretrained_weights_argument)
from nnunet_hyspark.methods.hyspark.weights import export_encoder
from nnunet_hyspark.weights import load_weights_file, transfer_report

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)
META = {"method": "hyspark", "spacing": [1.5, 1.5, 1.5], "normalization_schemes": ["CTNormalization"]}


def trained_encoder(channels=1) -> HybridEncoder:
    torch.manual_seed(3)
    enc = HybridEncoder(channels, **TINY)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))  # unlike any fresh initialisation
    return enc


def test_nnunet_load_pretrained_weights_accepts_the_export_for_any_patch_and_class_count(tmp_path):
    enc = trained_encoder()
    path = export_encoder(enc, META, tmp_path / "encoder_weights.pth")
    sidecar = json.loads((tmp_path / "encoder_weights.json").read_text())
    assert sidecar["method"] == "hyspark" and sidecar["architecture"]["widths"] == list(TINY["widths"])
    for classes, patch in ((4, (32, 32, 32)), (2, (16, 64, 48))):
        net = HySparKUNet(1, classes, patch_size=patch, **TINY)
        load_pretrained_weights(net, str(path))  # nnU-Net's module-level loader, as -pretrained_weights runs it
        for k, v in enc.state_dict().items():
            assert torch.equal(net.encoder.state_dict()[k], v), k
    weights, _ = load_weights_file(path)
    assert not any(".seg_layers." in k or "pos" in k for k in weights)
    assert all(v.device.type == "cpu" for v in weights.values())


def test_transfer_report_counts(tmp_path):
    path = export_encoder(trained_encoder(), META, tmp_path / "w.pth")
    weights, _ = load_weights_file(path)
    net = HySparKUNet(1, 3, **TINY)
    rep = transfer_report(net.state_dict(), weights)
    assert not rep["missing"] and not rep["ignored"] and not rep["shape_mismatch"]
    assert sum(k.startswith("encoder.") for k in rep["loaded"]) == len(net.encoder.state_dict())
    other = HySparKUNet(1, 3, widths=(8, 16, 16, 24, 48), depths=TINY["depths"], expansions=TINY["expansions"],
                        vit_depth=1, vit_heads=2)
    assert transfer_report(other.state_dict(), weights)["shape_mismatch"]


def official_layout(enc: HybridEncoder, grid=(6, 6, 6)) -> dict:
    """A state dict laid out like the published HySparK file (``docs/methods.md``)."""
    sd = dict(enc.state_dict())
    sd["mae.pos_embed"] = sincos_3d(enc.widths[4], grid)[None]
    sd["mae.mask_token"] = torch.zeros(1, 1, enc.widths[4])
    return sd


def test_convert_published_checkpoint_lists_every_key(tmp_path, capsys):
    enc = trained_encoder()
    src = tmp_path / "hyspark_official.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official_layout(enc).items()}, "epoch": 3}, src)
    out = tmp_path / "converted.pth"
    convert_main([str(src), str(out), "--vit-heads", "2"])
    printed = capsys.readouterr().out
    assert "ignored: mae.pos_embed" in printed and "ignored: mae.mask_token" in printed
    weights, meta = load_weights_file(out)
    assert meta["architecture"]["widths"] == list(TINY["widths"]) and meta["plans_check"] == "warn"
    net = HySparKUNet(1, 5, patch_size=(32, 48, 32), **TINY)
    load_pretrained_weights(net, str(out))
    assert torch.equal(net.encoder.embeddings.stem.weight, enc.embeddings.stem.weight)


def test_convert_refuses_an_incomplete_encoder_with_the_missing_keys(tmp_path, capsys):
    sd = official_layout(trained_encoder())
    del sd["mae.norm.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "broken.pth"), str(tmp_path / "o.pth"), "--vit-heads", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "mae.norm.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.pth").exists()


def test_channel_adaptation_repeats_the_stem(tmp_path):
    enc = trained_encoder()
    src = export_encoder(enc, META, tmp_path / "w.pth")
    out = tmp_path / "w3.pth"
    convert_main([str(src), str(out), "--in-channels", "3", "--vit-heads", "2"])
    net = HySparKUNet(3, 2, **TINY)
    load_pretrained_weights(net, str(out))
    stem = net.encoder.embeddings.stem
    assert torch.allclose(stem.weight, enc.embeddings.stem.weight.repeat(1, 3, 1, 1, 1) / 3)
    x = torch.randn(1, 1, 16, 16, 16)  # the same image in every channel gives the 1-channel response
    assert torch.allclose(stem(x.repeat(1, 3, 1, 1, 1)), enc.embeddings.stem(x), atol=1e-5)
    _, meta = load_weights_file(out)
    assert meta["spacing"] == META["spacing"]  # provenance kept


def test_plans_compatibility_detects_spacing_and_normalisation():
    props = {"0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}}
    meta = {**META, "foreground_intensity_properties_per_channel": props}
    assert plans_compatibility_problems(meta, [1.5, 1.5, 1.5], ["CTNormalization"], props) == []
    assert "spacing" in plans_compatibility_problems(meta, [1.0, 1.0, 3.0], ["CTNormalization"], props)[0]
    assert "normalisation" in plans_compatibility_problems(meta, [1.5] * 3, ["ZScoreNormalization"], props)[0]
    shifted = {"0": {**props["0"], "percentile_99_5": 1000.0}}
    assert "percentile_99_5" in plans_compatibility_problems(meta, [1.5] * 3, ["CTNormalization"], shifted)[0]


def test_pretrained_weights_argument_reads_nnunet_command_line(monkeypatch):
    monkeypatch.delenv("HYSPARK_PRETRAINED_WEIGHTS", raising=False)
    argv = ["nnUNetv2_train", "1", "3d_fullres", "0", "-tr", "X", "-pretrained_weights", "/w.pth"]
    assert pretrained_weights_argument(argv) == "/w.pth"
    assert pretrained_weights_argument(["nnUNetv2_train", "1"]) is None
    monkeypatch.setenv("HYSPARK_PRETRAINED_WEIGHTS", "/env.pth")
    assert pretrained_weights_argument(["python"]) == "/env.pth"
