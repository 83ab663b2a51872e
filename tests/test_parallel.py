"""`gacd.parallel` on 2 real gloo processes: a data-parallel contrast is the single-process
contrast (values, gradients, memory bank), and sharded evaluation counts every image once."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gacd import parallel
from gacd.contrastive import InBatchContrast, MemoryBankContrast
from gacd.data import ImageSplit
from gacd.evaluate import accuracy
from tests.conftest import free_port

BATCH, DIM, SAMPLES = 8, 6, 40


def embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=generator), dim=1)
    student = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=generator), dim=1)
    index = torch.randperm(SAMPLES, generator=generator)[:BATCH]
    labels = torch.arange(SAMPLES) % 4
    return teacher, student, index, labels


def contrasts(labels: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)  # the bank's random initial rows: the same in every process
    return {
        "in_batch": InBatchContrast(0.2),
        "memory_bank": MemoryBankContrast(labels, DIM, 12, 0.2, 0.5, False),
    }


def one_step(contrast: torch.nn.Module, rows: slice) -> tuple[torch.Tensor, ...]:
    """Loss (mean over `rows`), per-row losses and the gradients of this process's rows."""
    teacher, student, index, _ = embeddings()
    teacher = teacher[rows].clone().requires_grad_(True)
    student = student[rows].clone().requires_grad_(True)
    torch.manual_seed(2)  # the negatives' draws
    per_row = contrast(teacher, student, index[rows])
    per_row.mean().backward()
    return per_row.detach(), teacher.grad, student.grad


def worker(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = parallel.current()
        rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        out = {}
        for name, contrast in contrasts(embeddings()[3]).items():
            per_row, teacher_grad, student_grad = one_step(contrast, rows)
            banks = [b.clone() for b in contrast.buffers()]
            out[name] = (per_row, teacher_grad, student_grad, banks)
        # sharded evaluation: 23 images, a model that always answers 1 (right on odd labels)
        images = torch.arange(23, dtype=torch.uint8).reshape(23, 1, 1, 1)
        split = ImageSplit(images, (torch.arange(23) % 2).long())

        class AlwaysOne(torch.nn.Module):
            def forward(self, x):
                return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)

        out["accuracy"] = accuracy(AlwaysOne(), split, None, 5, torch.device("cpu"), limit=21)
        out["group"] = (group.rank, group.size)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_a_two_worker_contrast_is_the_single_process_contrast():
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    assert [results[r]["group"] for r in (0, 1)] == [(0, 2), (1, 2)]
    for name, contrast in contrasts(embeddings()[3]).items():
        per_row, teacher_grad, student_grad = one_step(contrast, slice(None))
        banks = list(contrast.buffers())
        halves = [results[r][name] for r in (0, 1)]
        torch.testing.assert_close(torch.cat([h[0] for h in halves]), per_row)
        # each worker's loss is the mean of its rows: the gradients, summed over the workers'
        # losses and averaged over workers (as DDP does), are the single-process ones
        for position, single in ((1, teacher_grad), (2, student_grad)):
            gathered = torch.cat([h[position] for h in halves]) / 2
            torch.testing.assert_close(gathered, single, msg=f"{name} gradient")
        for bank, first, second in zip(banks, halves[0][3], halves[1][3], strict=True):
            torch.testing.assert_close(first, bank, msg=f"{name} bank")
            torch.testing.assert_close(second, bank)
    # 21 images of 23 (limit), labels alternate 0, 1: 10 odd ones are right, counted once
    assert results[0]["accuracy"] == results[1]["accuracy"] == 10 / 21


def steps_without_batch_norm(results: dict | None = None, rank: int = 0, port: int = 0) -> dict:
    """Three `train_epoch` steps of natural training (batch norm swapped for identity: the one
    thing the rule keeps per worker) on the digits; alone or as rank `rank` of 2."""
    from gacd.config import Config
    from gacd.train import build_method, train_epoch

    if results is not None:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
    try:
        torch.set_num_threads(1)
        config = Config.from_dict(
            {
                "method": "natural",
                "data": {"name": "digits", "batch_size": 32},
                "student": {"arch": "small_cnn", "width": 8},
                "optim": {"epochs": 1, "lr": 0.1},
            }
        )
        from gacd.data import load_datasets

        device = torch.device("cpu")
        data = load_datasets(config.data, config.seed)
        torch.manual_seed(0)
        method = build_method(config, data, device)
        for module in list(method.student.modules()):
            for child, layer in list(module.named_children()):
                if isinstance(layer, torch.nn.BatchNorm2d):
                    setattr(module, child, torch.nn.Identity())
        start = {k: v.clone() for k, v in method.student.state_dict().items()}
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
        group = parallel.current()
        trained = parallel.data_parallel(method, device, group)
        terms = train_epoch(
            method, optimizer, data, config, 0, device, max_steps=3, trained=trained
        )
        out = {"weights": {k: v.clone() for k, v in method.student.state_dict().items()}}
        out["start"] = start
        out["terms"] = terms
        if results is not None:
            results[rank] = out
        return out
    finally:
        if results is not None:
            dist.destroy_process_group()


def test_two_workers_take_the_single_process_step_on_the_global_batch():
    """The rule (`data.batch_size` is the global batch, gradients averaged, lr unchanged):
    without batch norm, 2 workers' weights after 3 steps are the single process's, and so is
    the epoch's mean loss."""
    alone = steps_without_batch_norm()
    moved = [not torch.equal(alone["start"][k], v) for k, v in alone["weights"].items()]
    assert any(moved), "three steps at lr 0.1 moved no weight"
    with mp.Manager() as manager:
        results = manager.dict()
        port = free_port()
        processes = [
            mp.get_context("spawn").Process(
                target=steps_without_batch_norm, args=(results, rank, port)
            )
            for rank in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=300)
        assert [p.exitcode for p in processes] == [0, 0]
        results = dict(results)
    for rank in (0, 1):
        for name, value in alone["weights"].items():
            torch.testing.assert_close(results[rank]["weights"][name], value, msg=name)
        assert abs(results[rank]["terms"]["train/loss"] - alone["terms"]["train/loss"]) < 1e-5
