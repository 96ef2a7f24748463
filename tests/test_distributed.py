"""torchrun with 2 gloo processes on the CPU, and the sampler/metric pieces it relies on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, load_model
from coco import build_coco_gt, evaluate
from conftest import ROOT
from dataloader import LabelledImages, collate_fn
from distributed import DistInfo, ResumableSampler, epoch_samples_done, samples_trained
from engine import MAX_BAD_STEPS, READ_EVERY
from predictor import predict
from synthetic import make_dataset


def test_ranks_see_disjoint_samples_covering_the_epoch() -> None:
    data = list(range(10))
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(data, DistInfo(rank=rank, world_size=2), shuffle=True, seed=3)
        sampler.set_epoch(4)
        seen.append(list(sampler))
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(data)
    again = ResumableSampler(data, DistInfo(rank=0, world_size=2), shuffle=True, seed=3)
    again.set_epoch(4)
    again.skip = 2
    assert list(again) == seen[0][2:] and len(again) == len(seen[0]) - 2


@pytest.mark.parametrize("runs", [[(4, 2), (3, 2)], [(2, 2), (1, 1)], [(1, 1), (2, 3)], [(3, 1), (3, 2), (1, 2)],
                                  [(4, 2), (3, 1), (2, 2), (1, 1)]])
def test_a_stopped_epoch_continues_on_other_ranks_and_batches(runs: list[tuple[int, int]]) -> None:
    """(world size, batch size) of each process until it stops, 3 batches a rank, then resumed by
    the next: the samples skipped are the ones trained; none is left out, fewer than a batch a
    rank trained twice at each resume, every rank alike."""
    data, batches = list(range(48)), 3  # a multiple of every world size: no padding repeats a sample
    partial, trained, twice = None, [], 0
    for n, (world, batch) in enumerate(runs):
        skip = epoch_samples_done(partial, batch, world)
        samplers = [ResumableSampler(data, DistInfo(rank=r, world_size=world), shuffle=True, seed=5) for r in range(world)]
        now = []
        for sampler in samplers:
            sampler.set_epoch(2)
            sampler.skip = skip
            now.extend(list(sampler)[:batches * batch] if n < len(runs) - 1 else sampler)
        twice += len(set(trained) & set(now))
        trained += now
        partial = {"batches": 0, "samples": samples_trained(skip, batches, batch, world)}
    assert set(trained) == set(data)
    assert twice < sum(world for world, _ in runs[1:])
    assert epoch_samples_done(None, 2, 2) == 0
    assert epoch_samples_done({"batches": 3, "batch_size": 2}, 1, 2) == 6  # saved before samples were recorded


def test_torchrun_two_gloo_processes(tmp_path: Path, shallow: None) -> None:
    data = make_dataset(tmp_path / "data", n_train=6, n_test=1, size=(72, 80), cells=(3, 6), seed=2)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/shallow.py"), "train_resnet.py", "--train_dir", str(data["train_dir"]), "--output_dir", str(out),
           "--epochs", "1", "--batch_size", "1", "--val_split", "0.34", "--weights", "none", "--num_workers", "0",
           "--min_size", "64", "--max_size", "96", "--input_scale", "0", "--detections_per_img", "10", "--warmup_epochs", "1",
           "--rpn_pre_nms_top_n_train", "200", "--rpn_post_nms_top_n_train", "100",
           "--rpn_pre_nms_top_n_test", "200", "--rpn_post_nms_top_n_test", "50", "--box_batch_size_per_image", "32",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("data: 4 train / 2 val") == 1  # only rank 0 prints
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["epoch"] == 1
    assert ckpt["scheduler"]["steps"] == 2  # 4 samples over 2 ranks, batch 1
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] is not None

    # The metric gathered from 2 shards equals a single-process evaluation of the same weights.
    split = json.loads((out / "split.json").read_text())
    samples = sorted(p for p in Path(data["train_dir"]).iterdir())
    ids = {p.name: i + 1 for i, p in enumerate(samples)}
    val = LabelledImages([Path(data["train_dir"]) / n for n in split["val"]], [ids[n] for n in split["val"]])
    model, _, _ = load_model(out / "last.pth")
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=collate_fn)
    metrics = evaluate(build_coco_gt(val.instances, val.image_ids), predict(model, loader, torch.device("cpu")))
    for key in ("segm_AP", "segm_AP50", "bbox_AP"):
        assert history[0][key] == pytest.approx(metrics[key], abs=1e-9), key


VALIDATION_RANK = """
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import engine
from distributed import init_distributed
from history import LOSS_KEYS


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 1, 1), torch.nn.BatchNorm2d(1)

    def forward(self, images, targets):
        loss = self.bn(self.conv(torch.stack(images))).square().mean()
        return {key: loss for key in LOSS_KEYS}


info, device = init_distributed("cpu")
model = torch.nn.parallel.DistributedDataParallel(Toy(), broadcast_buffers=True)  # a collective per forward
data = [(torch.rand(3, 8, 8), {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "image_id": 1})]
loader = torch.utils.data.DataLoader(data[info.rank::info.world_size], batch_size=1, collate_fn=lambda b: tuple(zip(*b)))
losses = engine.validation_loss(model, loader, device, False, info)
with open(f"rank{info.rank}.txt", "w") as out:  # a file each: the ranks' stdout lines may interleave
    out.write(f"{len(loader)} {losses['val_loss']:.6f}")
dist.barrier()  # neither rank leaves while the other still talks to it
dist.destroy_process_group()
os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called"), results are written
"""


def _two_ranks(code: str, folder: Path, hang: str) -> None:
    """``code`` run by torchrun as 2 gloo ranks in ``folder`` (the project on their path); a
    hang fails the test with ``hang``."""
    script = folder / "rank.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(ROOT)]
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(hang)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_validation_loss_with_fewer_images_than_ranks(tmp_path: Path) -> None:
    """One validation image for two gloo ranks: the rank without a batch must not leave the
    other waiting in DDP's buffer broadcast; both report the one image's loss."""
    _two_ranks(VALIDATION_RANK, tmp_path, "validation_loss hung with an empty shard")
    (batches_0, loss_0), (batches_1, loss_1) = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert (batches_0, batches_1) == ("1", "0")
    assert loss_0 == loss_1  # the same averaged loss on both ranks


def test_each_rank_draws_its_own_augmentation_stream() -> None:
    """After ``decorrelate_ranks`` rank 0 draws what a single process draws, every other rank
    its own numbers; the same seed gives the same streams again (resumable, reproducible)."""
    from distributed import decorrelate_ranks

    def draws(rank: int) -> tuple:
        torch.manual_seed(5)
        decorrelate_ranks(DistInfo(rank=rank, world_size=3))
        import random

        import numpy as np
        return tuple(torch.rand(3).tolist()), float(np.random.rand()), random.random()

    torch.manual_seed(5)
    single = tuple(torch.rand(3).tolist())
    streams = [draws(rank) for rank in range(3)]
    assert streams[0][0] == single
    assert len({s[0] for s in streams}) == len({s[1] for s in streams}) == len({s[2] for s in streams}) == 3
    assert draws(2) == streams[2]


def test_a_numbered_cuda_device_becomes_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from devices import default_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert default_device("cuda:1") == torch.device("cuda:1") and current == [torch.device("cuda:1")]
    assert default_device("cpu") == torch.device("cpu") and len(current) == 1


DIVERGING_RANK = """
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import engine
from distributed import broadcast, init_distributed, share_buffers
from errors import DivergenceError

info, device = init_distributed("cpu")
# An epoch stopped after 2 steps and resumed for 1 reports what the 3 steps uninterrupted report.
losses = [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]][info.rank]
whole, first = engine.EpochMeter(), engine.EpochMeter()
for step, value in enumerate(losses):
    for meter in (whole, first) if step < 2 else (whole,):
        meter.add({}, torch.tensor(value), [step], skipped=torch.tensor(step == 0))
        meter.read(1, info)
saved = broadcast(first.saved(info, device, agreed=True), info)  # rank 0 writes last.pth, every rank reads it
later = engine.EpochMeter.resumed(saved, info)
later.add({}, torch.tensor(losses[2]), [2], skipped=torch.tensor(False))
later.read(1, info)
resumed_row, whole_row = later.summary(info, device), whole.summary(info, device)
same = all(abs(resumed_row[k] - whole_row[k]) < 1e-9 for k in ("train_loss", "skipped_steps"))

meter, raised_at = engine.EpochMeter(), None
for step in range(1, 3 * engine.MAX_BAD_STEPS + 1):
    # rank 0's loss is NaN at every step; rank 1's stays finite, its updates skipped (NaN gradients after the all-reduce)
    loss = torch.tensor(float("nan") if info.rank == 0 else 1.0)
    meter.add({}, loss, [step], skipped=torch.tensor(True))
    if step % engine.READ_EVERY == 0:
        try:
            meter.read(1, info)
        except DivergenceError:
            raised_at = step
            break
norm = torch.nn.BatchNorm2d(2)
norm.train()(torch.full((1, 2, 3, 3), float(info.rank)))  # each rank's statistics saw its own batch
share_buffers(norm, info)
with open(f"rank{info.rank}.txt", "w") as out:
    out.write(f"{raised_at} {norm.running_mean.tolist()} {int(norm.num_batches_tracked)} {same}")
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_ranks_stop_together_when_one_rank_diverges_and_score_with_rank_0s_statistics(tmp_path: Path) -> None:
    """Non-finite losses on one rank only: every rank raises at the same read, so none is left
    waiting in the next all-reduce (under srun or mp.spawn, for the process group's timeout).
    Before validation every rank takes rank 0's BatchNorm statistics (``share_buffers``). An
    epoch stopped and resumed averages every rank's steps once, as it would uninterrupted."""
    _two_ranks(DIVERGING_RANK, tmp_path, "a rank waited alone after the other stopped")
    first_read_after = -(-MAX_BAD_STEPS // READ_EVERY) * READ_EVERY  # the read that sees MAX_BAD_STEPS in a row
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [f"{first_read_after} [0.0, 0.0] 1 True"] * 2


def test_a_loader_worker_outlives_a_group_sigterm_for_a_grace_only() -> None:
    """In a worker, a SIGTERM (torchrun's or Slurm's, to the whole group) arms an alarm instead
    of ending it at once; a second one keeps the first one's end; Ctrl-C is ignored."""
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
            "from distributed import WORKER_STOP_GRACE, ignore_stop_signals\n"
            "ignore_stop_signals(0)\n"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
            "first = signal.alarm(30); signal.alarm(0)\n"  # remaining of the grace, then 30 s left
            "signal.alarm(30); os.kill(os.getpid(), signal.SIGTERM)\n"
            "print(first == WORKER_STOP_GRACE or first == WORKER_STOP_GRACE - 1, signal.alarm(0) <= 30)\n")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr
