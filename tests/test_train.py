"""The trainer: Table 1 arithmetic, exact loss averaging, LR halving and early stop that act,
clear errors before work, NaN and bad-image handling, and kill-anywhere resume that ends identical."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from faults import fault_env
from PIL import Image
from tiny_data import make_tiny_dataset
from torch import nn

import cxrlib.train as train
from cxrlib import dist, models, paths, recipe
from cxrlib.cache import cached_image_path
from cxrlib.fileio import load_verified
from cxrlib.labels import FINDINGS, masked_bce_with_logits, targets_and_mask
from cxrlib.run_folder import checkpoint_path, list_checkpoints
from cxrlib.splits import fold_ids, read_folds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def argv(data, out, *extra, epochs=2, resolution=32, train_images=8):
    return [
        "--index", str(data.index), "--folds", str(data.folds), "--cache", str(data.cache),
        "--resolution", str(resolution), "--fold", "0", "--out", str(out), "--epochs", str(epochs),
        "--weights", "none", "--batch-size", "4", "--effective-batch", "8", "--lr", "1e-3",
        "--max-train-images", str(train_images), *extra,
    ]  # fmt: skip


def history(out):
    return pd.read_csv(out / "history.csv")


# ----------------------------------------------------------------------------- recipe arithmetic


def test_table1_defaults_and_the_rule_between_them():
    for resolution, (lr, batch) in {256: (5e-4, 512), 512: (2.5e-4, 256), 1024: (1.6e-4, 168)}.items():
        assert recipe.default_effective_batch(resolution) == batch
        assert recipe.default_lr(resolution) == lr
    assert recipe.default_lr(2048) == 8.204e-5 and recipe.default_effective_batch(2048) == 42
    t = math.log2(768 / 512)  # log-linear in resolution between 512 (256) and 1024 (168)
    assert recipe.default_effective_batch(768) == round(256 ** (1 - t) * 168**t) == 200
    assert recipe.default_lr(768) == pytest.approx(5e-4 * recipe.default_effective_batch(768) / 512)
    assert recipe.default_effective_batch(64) == 512 and recipe.default_effective_batch(4096) == 42
    assert recipe.default_lr(256, effective_batch=128) == pytest.approx(1.25e-4)  # linear scaling


@pytest.mark.parametrize(
    "effective, world, per_gpu, max_per_gpu, expected, exact",
    [
        (512, 4, None, 128, (128, 1), True),  # 256 px on 4 GPUs
        (168, 6, None, 28, (28, 1), True),  # the paper's 1024 px on 6 A100s
        (42, 1, None, 16, (14, 3), True),  # 2048 px on one GPU: 14 x 3
        (42, 1, None, 4, (3, 14), True),  # at most 4 per GPU: 3 x 14, not 4 x 11 = 44
        (42, 1, None, 11, (7, 6), True),  # at most 11: 7 x 6, not 10 x 4 = 40
        (168, 8, None, 4, (3, 7), True),  # 1024 px on 8 GPUs, at most 4: 3 x 8 x 7, not 4 x 8 x 6 = 192
        (512, 6, None, 256, (85, 1), False),  # 512 / 6 has no exact split: 85 x 6 = 510, the closest
        (512, 6, None, 32, (17, 5), False),  # at most 32: 17 x 6 x 5 = 510
        (42, 4, None, 7, (5, 2), False),  # 5 x 4 x 2 = 40: logged as inexact
        (168, 4, 16, None, (16, 3), False),  # fixed batch: 16 x 4 x 3 = 192
        (8, 1, 4, None, (4, 2), True),
        (8, 2, 4, None, (4, 1), True),
    ],
)
def test_effective_batch_plan(effective, world, per_gpu, max_per_gpu, expected, exact):
    plan = recipe.plan_batches(effective, world, per_gpu, max_per_gpu)
    assert (plan.per_gpu_batch, plan.accumulation_steps) == expected
    assert plan.effective_batch == expected[0] * world * expected[1]
    assert plan.exact is exact
    assert ("cannot be matched exactly" in plan.describe()) is not exact
    assert plan.lr_scale == pytest.approx(plan.effective_batch / effective)
    if max_per_gpu is not None:
        assert plan.per_gpu_batch <= max_per_gpu


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7, 11, 16, 64, 256])
def test_an_exact_split_is_found_whenever_one_exists(resolution, world, limit):
    effective = recipe.default_effective_batch(resolution)
    exact = [
        (batch, steps)
        for steps in range(1, effective + 1)
        for batch in range(1, limit + 1)
        if batch * world * steps == effective
    ]
    plan = recipe.plan_batches(effective, world, None, max_per_gpu=limit)
    assert plan.exact is bool(exact)
    if exact:
        assert plan.accumulation_steps == min(steps for _, steps in exact)
    else:  # the closest of all splits within the limit
        closest = min(
            abs(batch * world * steps - effective)
            for steps in range(1, effective + 1)
            for batch in range(1, limit + 1)
        )
        assert abs(plan.effective_batch - effective) == closest


def test_mixed_precision_choice_on_cpu():
    cpu = torch.device("cpu")
    assert models.amp_dtype(cpu, "auto") is None and models.amp_dtype(cpu, "off") is None
    assert models.amp_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(train.ConfigError, match="fp16 needs a CUDA GPU"):
        models.amp_dtype(cpu, "fp16")
    assert recipe.default_per_gpu_batch(256, cpu) >= 1


def test_auto_precision_is_fp16_on_gpus_whose_bf16_is_only_emulated(monkeypatch):
    # V100 / T4: bf16 is emulated (slow), so fp16 with a GradScaler; bf16 from Ampere on
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert models.amp_dtype("cuda", "auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert models.amp_dtype("cuda", "auto") == torch.bfloat16


@pytest.mark.parametrize(
    "resolution, free_gib, amp, memory_efficient, expected",
    [
        (256, 79.2, torch.bfloat16, False, 256),  # H100: (0.8 x 79.2 - 1) / 0.083 = 751 -> the cap
        (1024, 79.2, torch.bfloat16, False, 32),  # 62.4 / 1.328 = 47 -> 32
        (2048, 79.2, torch.bfloat16, False, 8),  # 62.4 / 5.312 = 11.7 -> 8
        (2048, 79.2, torch.bfloat16, True, 16),  # half the memory per image: 23.5 -> 16
        (2048, 79.2, None, False, 4),  # float32: twice the memory per image: 5.9 -> 4
        (2048, 139.0, torch.float16, False, 16),  # H200: 110.2 / 5.312 = 20.7 -> 16
        (2048, 6.0, torch.bfloat16, False, 1),  # nothing fits: still 1
        (512, 0.0, torch.bfloat16, False, 1),
    ],
)
def test_automatic_batch_from_free_gpu_memory(resolution, free_gib, amp, memory_efficient, expected):
    free = int(free_gib * 2**30)
    assert (
        recipe.default_per_gpu_batch(resolution, "cuda", memory_efficient, amp, free_bytes=free) == expected
    )
    per_image = recipe.training_gib_per_image(resolution, amp, memory_efficient)
    assert expected == 1 or expected * per_image <= 0.8 * free_gib - 1  # what it picks fits the estimate


def test_automatic_batch_cap_cpu_default_and_the_2048_plan_on_one_h100():
    assert recipe.default_per_gpu_batch(256, "cuda", amp=torch.bfloat16, free_bytes=80 * 2**30, cap=64) == 64
    with pytest.raises(train.ConfigError, match="free memory"):
        recipe.default_per_gpu_batch(256, "cuda", amp=torch.bfloat16, free_bytes=-1)
    cpu = torch.device("cpu")
    assert recipe.default_per_gpu_batch(128, cpu) == 16 and recipe.default_per_gpu_batch(256, cpu) == 8
    auto = argparse.Namespace(
        resolution=256, effective_batch=None, lr=None, batch_size=None, memory_efficient=False
    )
    assert "CPU default" in recipe.plan_training(auto, 1, cpu, None).describe()[0]
    limit = recipe.default_per_gpu_batch(2048, "cuda", amp=torch.bfloat16, free_bytes=int(79.2 * 2**30))
    plan = recipe.plan_batches(recipe.default_effective_batch(2048), 1, None, max_per_gpu=limit)
    assert (plan.per_gpu_batch, plan.accumulation_steps, plan.exact) == (7, 6, True)  # Table 1's 42


# ----------------------------------------------------------------------------- loss averaging


class ImageSet(torch.utils.data.Dataset):
    """uint8 images with labels that include unknown (NaN) entries."""

    def __init__(self, n=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=generator)
        labels = (torch.rand(n, 14, generator=generator) < 0.4).float()
        labels[torch.rand(n, 14, generator=generator) < 0.3] = float("nan")
        self.targets, self.masks = targets_and_mask(labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i], self.masks[i]


def small_net():
    torch.manual_seed(0)  # no BatchNorm: micro-batch size must not matter at all
    return nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 14))


def one_epoch(dataset, per_gpu, steps, lr=0.1):
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # SGD: any error in the loss scale shows
    plan = train.BatchPlan(per_gpu, 1, steps, per_gpu * steps)
    info = dist.DistInfo(0, 1, 0, torch.device("cpu"), None)
    runtime = train.Runtime(info, None, False, plan, False, False)
    sampler = train.StepBlockSampler(dataset, 1, 0, per_gpu, steps, seed=0)
    loader = models.make_loader(dataset, per_gpu, sampler, 0, torch.device("cpu"), 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    augmentation = train.epoch_augmentation(len(dataset), 0, 1)
    result = train.train_one_epoch(model, loader, optimizer, scaler, runtime, 1, augmentation)
    return model, result


def test_accumulated_micro_batches_give_the_full_batch_update_over_known_labels():
    dataset = ImageSet()
    full, full_result = one_epoch(dataset, per_gpu=8, steps=1)
    for per_gpu, steps in [(4, 2), (2, 4), (1, 8)]:
        model, result = one_epoch(dataset, per_gpu, steps)
        for a, b in zip(model.parameters(), full.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6), (per_gpu, steps)
        assert result["train_loss"] == pytest.approx(full_result["train_loss"], rel=1e-6)
    # the loss is the BCE mean over known labels of the whole batch, before the update
    _, frozen = one_epoch(dataset, per_gpu=8, steps=1, lr=0.0)
    model = small_net()
    order = list(train.StepBlockSampler(dataset, 1, 0, 8, 1, seed=0))
    angles, flips = train.epoch_augmentation(len(dataset), 0, 1)
    x = train.augment_batch(dataset.images[order], angles[order], flips[order])
    expected = masked_bce_with_logits(model(x), dataset.targets[order], dataset.masks[order])
    assert frozen["train_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_unknown_labels_do_not_move_the_weights():
    dataset = ImageSet()
    reference, _ = one_epoch(dataset, per_gpu=4, steps=2)
    dataset.targets[dataset.masks == 0] = 1.0  # what an unmasked loss would now learn
    changed, _ = one_epoch(dataset, per_gpu=4, steps=2)
    for a, b in zip(reference.parameters(), changed.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors before work


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--resolution": "48"}, "--resolution 48: must be a multiple of 32"),
        ({"--resolution": "16"}, "at least 32"),
        ({"--fold": "4"}, "--fold 4: .* has folds 0 .. 3"),
        ({"--index": "absent.csv"}, "--index absent.csv: file not found"),
        ({"--weights": "absent.pt"}, "--weights absent.pt: not imagenet, none or an existing file"),
        ({"--amp": "fp16"}, "--amp fp16 needs a CUDA GPU"),
        ({"--epochs": "0"}, "--epochs must be at least 1"),
    ],
)
def test_wrong_parameters_fail_in_one_line_before_any_work(tiny, tmp_path, capsys, change, message):
    args = argv(tiny, tmp_path / "run")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert train.main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert re.search(message, error), error
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_only_options_are_refused_on_the_cpu(tiny, tmp_path, capsys):
    assert train.main([*argv(tiny, tmp_path / "a"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert train.main([*argv(tiny, tmp_path / "b"), "--sync-bn"]) == 2
    assert "--sync-bn needs CUDA" in capsys.readouterr().err


def test_cudnn_autotuning_is_on_by_default_and_off_with_its_flag(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        train, "train", lambda args, frames, info: seen.append(torch.backends.cudnn.benchmark) or {}
    )
    before = torch.backends.cudnn.benchmark
    assert train.main(argv(tiny, tmp_path / "a")) == 0
    assert train.main([*argv(tiny, tmp_path / "b"), "--no-cudnn-benchmark"]) == 0
    assert seen == [True, False] and torch.backends.cudnn.benchmark == before


def test_ranks_come_from_torchrun_or_slurm_and_a_lone_process_needs_no_group(monkeypatch):
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert dist.env_ranks(slurm) == (3, 8, 1)
    assert dist.env_ranks({**slurm, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}) == (5, 16, 5)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *slurm):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not dist.is_dist() and dist.all_reduce_min([3, 1]) == [3, 1]
    assert torch.equal(dist.all_reduce_sum(torch.ones(2)), torch.ones(2))


def test_more_processes_than_gpus_is_refused(monkeypatch):
    (
        monkeypatch.setenv("RANK", "1"),
        monkeypatch.setenv("WORLD_SIZE", "2"),
        monkeypatch.setenv("LOCAL_RANK", "1"),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(train.ConfigError, match="only 1 GPU"):
        dist.init_distributed()


def test_a_slurm_task_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch):
    # srun --ntasks-per-node=8 --gpus-per-task=1 python -m cxrlib.train ...: each task sees its own GPU
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="3", MASTER_ADDR="n1", MASTER_PORT="1")
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    groups = []
    monkeypatch.setattr(dist.dist, "rendezvous", lambda *args, **kw: iter([(object(), 3, 8)]))
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kw: groups.append(kw))
    info = dist.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 3)
    assert info.device == torch.device("cuda", 0)
    assert groups[0]["backend"] == "nccl" and groups[0]["device_id"] == torch.device("cuda", 0)


def plan_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """A process of a gloo group whose GPU has its own free memory (rank 0: 100 GiB, rank 1: 20 GiB)
    plans the 2048 px training: automatically, then with a different --batch-size per rank."""
    import json

    import torch.distributed as tdist

    torch.cuda.mem_get_info = lambda device=None: ((100, 20)[rank] * 2**30, 141 * 2**30)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for batch_size in (None, 4 * (rank + 1)):
        args = argparse.Namespace(
            resolution=2048, effective_batch=None, lr=None, batch_size=batch_size, memory_efficient=False
        )
        try:
            plan = recipe.plan_training(args, world, torch.device("cuda"), torch.bfloat16)
            results.append([plan.batches.per_gpu_batch, plan.batches.accumulation_steps, plan.batch_limit])
        except train.ConfigError as error:
            results.append(str(error))
    tdist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_processes_agree_on_the_smallest_automatic_batch_and_refuse_different_plans(tmp_path):
    import torch.multiprocessing

    torch.multiprocessing.spawn(plan_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # the smaller GPU's limit, 2 (rank 0 alone: 8)
    limit = recipe.default_per_gpu_batch(2048, "cuda", amp=torch.bfloat16, free_bytes=20 * 2**30)
    expected = recipe.plan_batches(42, 2, max_per_gpu=limit)  # Table 1's 42 at 2048 px
    for automatic, different in ranks:
        assert automatic == [expected.per_gpu_batch, expected.accumulation_steps, limit]
        assert different.startswith("the processes planned different batches")


def test_loader_workers_and_prefetch_fit_the_cores_the_gpus_and_the_image_size(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda = torch.device("cuda")
    assert models.default_workers(cuda, 1) == 8 and models.default_workers(torch.device("cpu"), 1) == 0
    assert models.default_workers(cuda, 8) == 2  # 8 GPUs on 16 cores: two workers each, not one
    assert models.prefetch_batches(8, 256, 256) == 4
    for workers, batch, resolution in (
        (8, 256, 256),
        (8, 512, 256),
        (8, 14, 2048),
        (8, 28, 2048),
        (2, 8, 2048),
    ):
        prefetch = models.prefetch_batches(workers, batch, resolution)  # shared memory of one loader:
        assert 1 <= prefetch <= 4 and workers * prefetch * batch * resolution**2 <= 2**30  # at most 1 GiB


def test_the_validation_loader_ends_its_workers_after_each_validation(tiny):
    args = argparse.Namespace(
        resolution=32, cache=tiny.cache, cache_format="png", skip_bad_images=False, seed=0
    )
    frames = {role: tiny.frame.iloc[:8] for role in ("train", "val")}
    info = dist.DistInfo(0, 1, 0, torch.device("cpu"), None)
    train_loader, val_loader = train.training_loaders(frames, args, info, recipe.BatchPlan(4, 1, 1, 4), 2)
    assert train_loader.persistent_workers and not val_loader.persistent_workers
    assert val_loader.batch_size == 8 and val_loader.prefetch_factor == 4


def test_missing_cached_image_is_named_with_the_command_to_build_it(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32,))
    victim = data.frame["dicom_id"].iloc[5]
    cached_image_path(data.cache, 32, victim).unlink()
    assert train.main(argv(data, tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert str(cached_image_path(data.cache, 32, victim)) in error
    assert "python -m cxrlib.cache --index" in error and "--resolutions 32" in error


# ----------------------------------------------------------------------------- the schedule acts


@pytest.mark.slow
def test_lr_halves_in_the_optimizer_and_training_stops_after_ten_bad_epochs(tiny, tmp_path, monkeypatch):
    losses = iter([1.0, 0.9] + [0.95] * 30)  # best at epoch 2, then no improvement
    monkeypatch.setattr(train, "evaluate_loss", lambda *args: next(losses))
    out = tmp_path / "run"
    assert train.main(argv(tiny, out, "--effective-batch", "4", epochs=30, train_images=4)) == 0
    rows = history(out)
    # stops at epoch 12: ten epochs (3..12) without improvement, not at --epochs 30
    assert rows["epoch"].tolist() == list(range(1, 13))
    # PyTorch patience 3: halved after the 4th bad epoch (6) and again after the 8th (10)
    assert rows["lr"].tolist() == [1e-3] * 6 + [5e-4] * 4 + [2.5e-4] * 2
    newest = load_verified(list_checkpoints(out)[0][1])
    assert newest["optimizer"]["param_groups"][0]["lr"] == 2.5e-4  # the optimizer's own lr
    done = json.loads((out / "done.json").read_text())
    assert done["reason"] == "early_stop" and done["best_epoch"] == 2
    assert json.loads((out / "best_model.pt.json").read_text())["epoch"] == 2


# ----------------------------------------------------------------------------- NaN and bad images


class NaNOnCalls(nn.Module):
    """DenseNet whose training forward passes number ``calls`` (counting from 1) return NaN logits."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.nan_calls, self.count = inner, set(calls), 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.count += 1
            if self.count in self.nan_calls:
                out = out * float("nan")
        return out


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_batch_and_best_stays_finite(tiny, tmp_path, monkeypatch, capsys):
    build = models.build_model
    # 8 images in micro-batches of 4: training call 3 is epoch 2, batch 1
    monkeypatch.setattr(models, "build_model", lambda *a, **k: NaNOnCalls(build(*a, **k), calls=range(3, 99)))
    out = tmp_path / "run"
    assert train.main(argv(tiny, out, epochs=3)) == 1
    assert "non-finite training loss (NaN or inf) in epoch 2, batch 1" in capsys.readouterr().err
    assert json.loads((out / "best_model.pt.json").read_text())["epoch"] == 1
    best = load_verified(out / "best_model.pt")
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    assert [e for e, _ in list_checkpoints(out)] == [1]


@pytest.mark.slow
def test_skip_nonfinite_steps_skips_and_finishes(tiny, tmp_path, monkeypatch):
    build = models.build_model
    # micro-batches of 4 with no accumulation: training call 3 is epoch 2's first optimizer step
    monkeypatch.setattr(models, "build_model", lambda *a, **k: NaNOnCalls(build(*a, **k), calls=[3]))
    out = tmp_path / "run"
    assert train.main(argv(tiny, out, "--skip-nonfinite-steps", "--effective-batch", "4", epochs=2)) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["skipped_nonfinite_steps"] == 1
    assert history(out)[["train_loss", "val_loss"]].notna().all().all()


@pytest.mark.slow
def test_bad_image_is_named_or_skipped_by_the_option_never_zeroed(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32,))
    victim = fold_ids(read_folds(data.folds), 0, "train")[1]
    path = cached_image_path(data.cache, 32, victim)
    path.write_bytes(path.read_bytes()[:40])  # truncated PNG
    assert train.main(argv(data, tmp_path / "strict", epochs=1)) == 1
    assert f"cannot read image {path}" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=f"skipping unreadable image: cannot read image {path}"):
        assert train.main(argv(data, tmp_path / "skip", "--skip-bad-images", epochs=1)) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    with pytest.raises(OSError):
        Image.open(path).load()  # still broken: nothing replaced it


# ----------------------------------------------------------------------------- resume rules


@pytest.mark.slow
def test_finished_run_is_skipped_other_settings_refused_no_resume_starts_over(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(argv(tiny, out, epochs=1)) == 0
    first = (out / "done.json").read_text()
    assert train.main(argv(tiny, out, epochs=1)) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "done.json").read_text() == first
    assert train.main(argv(tiny, out, epochs=1, resolution=64)) == 2
    assert "other settings (resolution: 32 there, 64 now)" in capsys.readouterr().err
    assert train.main(argv(tiny, out, "--no-resume", epochs=1, resolution=64)) == 0
    assert json.loads((out / "done.json").read_text())["fingerprint"]["resolution"] == 64
    assert "resumed" not in capsys.readouterr().out


HOLD_RUN_FOLDER = """
import sys
from pathlib import Path
from cxrlib.run_folder import run_folder_lock
with run_folder_lock(Path(sys.argv[1]), is_main=True):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes stdin
"""


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_writes_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-c", HOLD_RUN_FOLDER, str(out)]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main(argv(tiny, out, epochs=1)) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: another training run is writing {out} (pid {holder.pid} on ")
        assert sorted(p.name for p in out.iterdir()) == [paths.LOCK]  # nothing of the refused run
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    assert train.main(argv(tiny, out, epochs=1)) == 0  # free once the first has finished
    assert (out / "done.json").is_file()


# ----------------------------------------------------------------------------- kill anywhere, end identical


def run_trainer(data, out, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(fault_env(fault) if fault else {})
    command = [sys.executable, "-m", "cxrlib.train", *argv(data, out, "--deterministic", epochs=3)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def assert_same_run(out, reference):
    keep = ["epoch", "train_loss", "val_loss", "lr"]  # all but the timing columns
    pd.testing.assert_frame_equal(history(out)[keep], history(reference)[keep], check_exact=True)
    for name in ("best_model.pt", "checkpoint_epoch003.pt"):
        ours, theirs = load_verified(out / name), load_verified(reference / name)
        ours, theirs = ours.get("model", ours), theirs.get("model", theirs)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (out / "test_predictions.csv").read_bytes() == (reference / "test_predictions.csv").read_bytes()


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_trainer(tiny, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_sigkill_during_epoch_2_then_same_command_ends_identical(tiny, reference_run, tmp_path):
    out = tmp_path / "run"
    killed = run_trainer(tiny, out, fault="train-batch:epoch=2:batch=2")
    assert killed.returncode == -9
    assert [e for e, _ in list_checkpoints(out)] == [1]
    resumed = run_trainer(tiny, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint_epoch001.pt" in resumed.stdout
    assert_same_run(out, reference_run)
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert list(predictions.columns) == ["dicom_id", *FINDINGS]


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_same_command_ends_identical(tiny, reference_run, tmp_path):
    out = tmp_path / "run"
    killed = run_trainer(tiny, out, fault="checkpoint-rename:epoch=2")
    assert killed.returncode == -9
    assert list(out.glob(".checkpoint_epoch002.pt.*.tmp"))  # complete temporary file, never renamed
    assert not checkpoint_path(out, 2).exists()
    resumed = run_trainer(tiny, out)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob("*.tmp"))
    assert_same_run(out, reference_run)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_previous_and_ends_identical(tiny, reference_run, tmp_path):
    out = tmp_path / "run"
    assert run_trainer(tiny, out, fault="train-batch:epoch=3:batch=1").returncode == -9
    newest = checkpoint_path(out, 2)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. by a full disk
    resumed = run_trainer(tiny, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint_epoch002.pt" in resumed.stderr and "truncated" in resumed.stderr
    assert "resumed from checkpoint_epoch001.pt" in resumed.stdout
    assert_same_run(out, reference_run)


def scored(tiny, model, resolution):
    """Fold 0's test images scored by a trained model at ``resolution``, as the notebooks do."""
    from cxrlib.cache import CXRDataset
    from cxrlib.index import read_index

    index = read_index(tiny.index)
    ids = set(fold_ids(read_folds(tiny.folds, index), 0, "test"))
    dataset = CXRDataset(index[index["dicom_id"].isin(ids)].reset_index(drop=True), resolution, tiny.cache)
    return models.predict_logits(models.load_trained_model(model), dataset)


@pytest.mark.slow
def test_trained_model_scores_any_resolution_and_matches_the_trainer(tiny, reference_run):
    ours = scored(tiny, reference_run, 32)
    trainer = pd.read_csv(reference_run / "test_predictions.csv", dtype={"dicom_id": str})
    assert ours["dicom_id"].tolist() == trainer["dicom_id"].tolist()
    assert ours[list(FINDINGS)].to_numpy() == pytest.approx(trainer[list(FINDINGS)].to_numpy(), abs=1e-5)
    at64 = scored(tiny, reference_run, 64)  # trained at 32 px, tested at 64 px: the train x test matrix
    assert at64["dicom_id"].tolist() == trainer["dicom_id"].tolist()
    assert not at64[list(FINDINGS)].equals(ours[list(FINDINGS)])


@pytest.mark.slow
def test_bf16_autocast_trains_on_the_cpu_and_saves_float32_logits(tiny, tmp_path):
    from cxrlib import metrics

    out = tmp_path / "run"
    assert train.main(argv(tiny, out, "--amp", "bf16", epochs=2, train_images=24)) == 0
    assert json.loads((out / "done.json").read_text())["complete"]
    assert history(out)[["train_loss", "val_loss"]].map(math.isfinite).all().all()
    saved = pd.read_csv(out / "test_predictions.csv", dtype={"dicom_id": str}).set_index("dicom_id")
    logits = saved[list(FINDINGS)].to_numpy().astype(np.float32)
    assert np.isfinite(logits).all()
    # A bf16 number is a float32 whose low 16 bits are zero; float32 logits almost never are.
    low_bits = logits.view(np.uint32) & 0xFFFF
    assert (low_bits != 0).mean() > 0.95
    # Scored again in float32: the same AUCs.
    float32 = scored(tiny, out, 32).set_index("dicom_id").loc[saved.index]
    labels = tiny.frame.set_index("dicom_id").loc[saved.index]
    for finding in ("Cardiomegaly", "Pleural Effusion"):
        auc = metrics.finding_auc(labels[finding].to_numpy(), saved[finding].to_numpy())[0]
        reference = metrics.finding_auc(labels[finding].to_numpy(), float32[finding].to_numpy())[0]
        assert auc == pytest.approx(reference, abs=1e-3)


@pytest.mark.slow
def test_an_inexact_effective_batch_scales_the_learning_rate_and_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    # 4 per process, asked for 6: 2 accumulation steps make 8, so the lr is scaled by 8 / 6
    args = argv(tiny, out, epochs=1)
    args[args.index("--effective-batch") + 1] = "6"
    assert train.main(args) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["lr_requested"] == pytest.approx(1e-3)
    assert done["lr_scale"] == pytest.approx(8 / 6) and done["lr"] == pytest.approx(1e-3 * 8 / 6)
    assert history(out)["lr"].iloc[0] == pytest.approx(1e-3 * 8 / 6)
    assert "lr 0.001 x 8/6" in capsys.readouterr().out
