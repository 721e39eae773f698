"""torch.distributed pre-training on CPU (gloo, 2 processes): same parameters on every rank, and the
step equals a single-process step on the doubled batch (synchronised BatchNorm included)."""
import gc
import os
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import train_on_masks
from test_hardware import EPYC, SAPPHIRE
from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.methods.hyspark.model import HySparK
from nnunet_hyspark.pretraining.distributed import DistContext

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)
STEPS = 3


def model_and_data():
    torch.manual_seed(0)
    model = HySparK(HybridEncoder(1, **TINY), decoder_width=32)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.randn(4, 1, 2, 2, 2, generator=g), size=(32, 32, 32),
                                        mode="trilinear", align_corners=True)
    masks = [model.random_mask(x, g) for _ in range(STEPS)]
    return model, x, masks


def train(model, x, masks, wrapped=None):
    wrapped = wrapped or model
    # SGD is linear in the gradients, so equal parameters mean equal gradients (Adam would turn
    # float-level noise in near-zero gradients into full-size steps)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return train_on_masks(wrapped, x, masks, opt)


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = DistContext.from_environment("cpu")
    model, x, masks = model_and_data()
    half = slice(2 * rank, 2 * rank + 2)  # every rank its own samples
    ddp = ctx.wrap(model, torch.device("cpu"))
    losses = train(model, x[half], [m[half] for m in masks], ddp)
    mean_losses = [ctx.mean(l).item() for l in losses]
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(2)]
    dist.all_gather(gathered, params)
    if rank == 0:
        torch.save({"params": gathered, "losses": mean_losses, "data": x[half]}, out)
    del ddp  # its reducer holds the process group: release it before the group goes
    gc.collect()
    ctx.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert torch.equal(res["params"][0], res["params"][1]), "parameters differ across ranks"
    model, x, masks = model_and_data()
    single = train(model, x, masks)
    ref = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert res["losses"] == pytest.approx([l.item() for l in single], rel=1e-4, abs=1e-5)
    # float-level differences only (sums of squares for the synchronised statistics): ~3e-5 after 3 steps
    assert torch.allclose(res["params"][0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_torchrun_pretrain_two_processes(synthetic_ct, tmp_path):
    env = {**synthetic_ct["env"], "OMP_NUM_THREADS": "1"}
    d, u = str(synthetic_ct["labelled"]), str(synthetic_ct["unlabeled"])
    out = tmp_path / "ddp_run"
    torchrun = os.path.join(os.path.dirname(os.sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(os.path.dirname(os.sys.executable), "hyspark_pretrain"), "-d", d, u, "--epochs", "1",
           "--iterations", "2", "--val-iterations", "1", "-b", "1", "--num-workers", "0", "-o", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "encoder_weights.pth").is_file() and (out / "checkpoint_final.pth").is_file()
    log = (out / "training_log.txt").read_text()
    assert "world size 2" in log and log.count("epoch 0:") == 1  # rank 0 alone writes


def precision_worker(rank, port, out):
    from nnunet_hyspark.hardware import parse_cpuinfo
    from nnunet_hyspark.pretraining.run import PretrainOptions, resolve_precision

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    ctx = DistContext.from_environment("cpu")
    # the ranks would decide differently on their own: rank 0 sees an AMX CPU (bf16), rank 1 one without
    # bf16 units (fp32); both must run rank 0's choice
    cpu = parse_cpuinfo(SAPPHIRE if rank == 0 else EPYC)
    opts, notes = resolve_precision(PretrainOptions(datasets=["1"], precision="auto"), "cpu", cpu, dist=ctx)
    torch.save({"precision": opts.precision, "notes": notes}, f"{out}.{rank}")
    ctx.close()


def test_precision_auto_is_rank_zeros_choice_on_every_rank(tmp_path):
    out = tmp_path / "precision"
    mp.spawn(precision_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [r["precision"] for r in results] == ["bf16", "bf16"]
    assert results[0]["notes"] == results[1]["notes"] == [
        "--precision auto: bf16 (CPU with AMX (Intel(R) Xeon(R) Platinum 8480+))"]
