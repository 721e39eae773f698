"""The pre-training loop: resume, atomic checkpoints, NaN stop, Ctrl-C, exported weights."""
import os
import signal
from pathlib import Path

import pytest
import torch

from nnunet_hyspark.io import atomic_torch_save
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.hyspark.model import HySparK
from nnunet_hyspark.pretraining.loop import LoopConfig, NonFiniteLoss, Pretrainer
from nnunet_hyspark.methods import METHODS

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)


def constant_batches(seed=0, shape=(2, 1, 32, 32, 32)):
    batch = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    while True:
        yield batch


def make_trainer(out: Path, epochs=2, iterations=3, train_iter=None, model=None) -> Pretrainer:
    torch.manual_seed(0)
    model = model or HySparK(HybridEncoder(1, **TINY), decoder_width=32)
    cfg = LoopConfig(epochs=epochs, iterations_per_epoch=iterations, val_iterations=1, lr=1e-3, save_every=1,
                     preview_every=1)
    return Pretrainer(model, METHODS["hyspark"], cfg, train_iter or constant_batches(), constant_batches(1), out,
                      {"method": "hyspark", "spacing": [1.5] * 3, "normalization_schemes": ["CTNormalization"]},
                      torch.device("cpu"), progress=False)


def test_run_writes_everything_a_user_looks_at(tmp_path):
    weights = make_trainer(tmp_path).run()
    for name in ("training_log.txt", "progress.png", "progress.json", "checkpoint_latest.pth",
                 "checkpoint_final.pth", "encoder_weights.pth", "encoder_weights.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert weights == tmp_path / "encoder_weights.pth"
    assert not list(tmp_path.glob(".*.tmp"))


def test_schedules_follow_the_reference_recipe(tmp_path):
    t = make_trainer(tmp_path, epochs=10, iterations=10)
    total = 100
    assert t.lr_at(0) == pytest.approx(0.005 * 1e-3)
    assert t.lr_at(40) == pytest.approx(1e-3)  # warm-up over 40% of the run
    assert t.lr_at(total) == pytest.approx(0.001 * 1e-3)
    assert t.weight_decay_at(0) == pytest.approx(0.04) and t.weight_decay_at(total) == pytest.approx(0.2)
    groups = t.optimizer.param_groups
    assert any(g["weight_decay"] == 0 for g in groups) and any(g["weight_decay"] > 0 for g in groups)


def interrupting_batches(at: int):
    """Constant batches; Ctrl-C arrives while the batch with index ``at`` is being trained on."""
    for i, b in enumerate(constant_batches()):
        if i == at:
            os.kill(os.getpid(), signal.SIGINT)
        yield b


@pytest.mark.parametrize("interrupt_at", [2, 4])  # at the end of epoch 1, and in the middle of epoch 2
def test_ctrl_c_saves_and_resume_continues_to_the_same_state(tmp_path, interrupt_at):
    straight = make_trainer(tmp_path / "a", epochs=3)
    straight.run()
    stopped = make_trainer(tmp_path / "b", epochs=3, train_iter=interrupting_batches(interrupt_at))
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    state = torch.load(tmp_path / "b" / "checkpoint_latest.pth", weights_only=False)
    assert state["step"] == interrupt_at + 1  # the step in progress is completed, then saved
    assert not (tmp_path / "b" / "encoder_weights.pth").exists()
    resumed = make_trainer(tmp_path / "b", epochs=3)
    resumed.run(resume_from=tmp_path / "b" / "checkpoint_latest.pth")
    assert resumed.step == straight.step == 9
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.allclose(sa[i]["exp_avg"], sb[i]["exp_avg"], atol=1e-6) for i in sa)
    assert straight.history["train_loss"] == pytest.approx(resumed.history["train_loss"], abs=1e-6)
    assert straight.history["val_loss"] == pytest.approx(resumed.history["val_loss"], abs=1e-6)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pth"
    atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


class NaNAfter(torch.nn.Module):
    """Wraps a model; its loss becomes NaN from the n-th call on."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0
        self.encoder = model.encoder

    def forward(self, x, mask=None):
        out = self.model(x, mask)
        self.calls += 1
        if self.calls > self.n and self.training:
            out["loss"] = out["loss"] * float("nan")
        return out

    def random_mask(self, *a):
        return self.model.random_mask(*a)

    def reconstruct(self, *a):
        return self.model.reconstruct(*a)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = NaNAfter(HySparK(HybridEncoder(1, **TINY), decoder_width=32), n=4)
    t = make_trainer(tmp_path, epochs=3, iterations=3, model=model)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3 "):
        t.run()
    state = torch.load(tmp_path / "checkpoint_latest.pth", weights_only=False)
    assert state["step"] == 3  # the end of epoch 1, the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bf16_autocast_runs_on_the_cpu_when_asked(tmp_path):
    t = make_trainer(tmp_path, epochs=1, iterations=2)
    t.cfg.precision = "bf16"
    lr, loss = t.train_step(next(constant_batches()))
    assert 0.5 < loss < 1.5
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # autocast, not a bf16 model


def test_fp16_is_refused_on_the_cpu(tmp_path):
    from nnunet_hyspark.errors import HySparKError

    torch.manual_seed(0)
    cfg = LoopConfig(epochs=1, iterations_per_epoch=1, precision="fp16")
    with pytest.raises(HySparKError, match="fp16 needs CUDA"):
        Pretrainer(HySparK(HybridEncoder(1, **TINY), decoder_width=32), METHODS["hyspark"], cfg,
                   constant_batches(), None, tmp_path, {}, torch.device("cpu"), progress=False)
