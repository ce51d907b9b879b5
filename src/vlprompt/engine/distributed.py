"""The processes of one job: data sharding, gradient averaging and metric reduction over ``torch.distributed``.

A job started by ``torchrun`` or ``accelerate launch`` runs one process per device (or several CPU processes with
gloo); ``make_accelerator`` joins them into one process group. Every function here is a no-op (or the identity)
in a single process, so the trainer and tasks run the same code either way.

Semantics (docs/scaling.md):

- ``--batch-size`` is the **global** batch: each optimisation step consumes the same samples in any number of
  processes, each process taking a contiguous slice of the step's batch. The learning rate therefore needs no
  change when the number of processes changes, and a run resumes with another number of processes.
- The gradient of a step is the gradient of the global batch's mean loss: each process weights its loss by its
  share of the batch and the gradients are summed (:func:`sum_gradients`). This is exact for losses that are a mean
  over the batch's samples plus terms that do not depend on the batch (every registered method's loss).
- Training augmentation draws from a generator seeded by (run seed, epoch, image index) (:class:`ItemSeeded`), so
  an image gets the same crop whatever process or loader worker reads it.
- Evaluation is sharded in contiguous blocks; counts are summed and features gathered in order, so metrics equal a
  single process's.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, Subset

# Gradients are summed in flat buffers of at most this many elements (fewer, larger messages; bounded memory).
BUCKET_ELEMENTS = 16 * 1024 * 1024


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch) set it, before any process group
    exists: lets code that runs before training (the CLI's messages) speak once per job."""
    return int(os.environ.get("RANK", "0") or 0)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo (CPU jobs, and accelerate's "cuda:nccl,cpu:gloo") moves CPU tensors.
    backend = str(dist.get_backend())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed element-wise over the job's processes (returned on ``values``' device)."""
    if world_size() == 1:
        return values
    buffer = values.detach().to(_comm_device(), torch.float64)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device, values.dtype)


def gather_objects(item: Any) -> list[Any]:
    """Every process's ``item``, in rank order."""
    if world_size() == 1:
        return [item]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def broadcast_from_main(item: Any) -> Any:
    """The main process's ``item`` in every process."""
    if world_size() == 1:
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def run_on_main(action: Callable[[], Any], error_types: tuple[type[BaseException], ...]) -> Any:
    """Run ``action`` on the main process only and hand its result, or its error (one of ``error_types``), to every
    process: the others raise the same error instead of waiting forever for a main process that stopped."""
    if world_size() == 1:
        return action()
    outcome: tuple[str, Any]
    if is_main():
        try:
            outcome = ("ok", action())
        except error_types as err:
            outcome = ("error", err)
    else:
        outcome = ("ok", None)
    outcome = broadcast_from_main(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


# ---------------------------------------------------------------------------------------------- data
def block_of(n: int) -> range:
    """This process's contiguous block of ``n`` items (blocks in rank order tile ``range(n)``)."""
    world, me = world_size(), rank()
    return range(n * me // world, n * (me + 1) // world)


def shard(dataset: Dataset) -> Dataset:
    """This process's block of an evaluation dataset (the whole dataset in a single process)."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, list(block_of(len(dataset))))  # type: ignore[arg-type]


def loader_worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """How a DataLoader of this process starts its ``num_workers`` workers (None: torch's default, fork on Linux).

    In a job of several processes the process group's communication threads are running when a loader starts its
    workers; a worker forked while one of those threads holds a lock inherits the lock held and can wait on it
    forever (seen as a job that hangs after an epoch, when the evaluation loader starts fresh workers). There the
    workers start from a clean server process instead ("forkserver", with torch preloaded so a worker starts fast;
    "spawn" where the platform has no forkserver). A single process keeps fork, the fastest."""
    if num_workers <= 0 or world_size() == 1:
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "vlprompt.engine.distributed"])  # no effect once the server runs
    return context


def gather_blocks(local: torch.Tensor | None) -> torch.Tensor:
    """The rows every process computed for its :func:`block_of` (``None`` for an empty block), concatenated in the
    dataset's order, on the CPU. Rows travel as tensors (padded to the largest block), not pickled objects: a
    feature cache of a large training set stays one copy per process."""
    if world_size() == 1:
        if local is None:
            raise ValueError("nothing to gather: the dataset is empty")
        return local
    # Every process learns each block's row count and the rows' shape and dtype (an empty block knows neither).
    described = gather_objects(None if local is None else (local.shape[0], tuple(local.shape[1:]), local.dtype))
    shapes = [d for d in described if d is not None]
    if not shapes:
        raise ValueError("nothing to gather: the dataset is empty")
    _, row_shape, dtype = shapes[0]
    counts = [0 if d is None else d[0] for d in described]
    longest = max(counts)
    device = _comm_device()
    padded = torch.zeros((longest, *row_shape), dtype=dtype, device=device)
    if local is not None and local.shape[0]:
        padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count].cpu() for part, count in zip(parts, counts)])


def item_seed(run_seed: int, epoch: int, index: int) -> int:
    # Distinct, well-separated seeds per (run, epoch, image); a fixed formula so a resumed run draws the same.
    return ((run_seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


class ItemSeeded(Dataset):
    """Reads ``dataset[index]`` with torch's RNG seeded for that (epoch, index) pair: a random training transform
    draws the same crop and flip for an image in any process, loader worker or batch. Items are requested as
    ``(index, seed)`` pairs (:class:`GlobalBatches` makes them), so persistent workers need no epoch update."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: a GPU's draws are the method's
            return self.dataset[index]


class GlobalBatches(Sampler[list[tuple[int, int]]]):
    """The epoch's global batches (a seeded shuffle cut into ``batch_size`` pieces, the same in every process),
    each cut into one contiguous slice per process; yields this process's slice as ``(index, item seed)`` pairs.
    A slice may be empty (a last batch smaller than the number of processes)."""

    def __init__(self, n: int, batch_size: int, run_seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.run_seed = run_seed
        self.world = world_size()
        self.rank = rank()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's order (once: the shares and the iteration read the same batches)."""
        self.epoch = epoch
        generator = torch.Generator().manual_seed(self.run_seed * 1000 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        self.batches = [order[start:start + self.batch_size] for start in range(0, self.n, self.batch_size)]

    def shares(self, weight: Callable[[Sequence[int]], float] = len) -> list[float]:
        """This process's weight in each global batch's summed gradient: its slice's loss normaliser over the
        batch's (``weight`` of a list of indices: the number of images, or of target boxes for detection)."""
        return [weight(self._slice(batch)) / weight(batch) for batch in self.batches]

    def _slice(self, batch: Sequence[int]) -> Sequence[int]:
        size = len(batch)
        return batch[size * self.rank // self.world: size * (self.rank + 1) // self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(index, item_seed(self.run_seed, self.epoch, index)) for index in self._slice(batch)]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class EmptyAwareCollate:
    """The task's collate function, with an empty slice collated to ``None`` (the process then takes part in the
    step's gradient sum with nothing of its own). A class, not a closure, so loader workers can pickle it."""

    def __init__(self, collate: Callable[[list], Any] | None) -> None:
        self.collate = collate

    def __call__(self, items: list) -> Any:
        if not items:
            return None
        if self.collate is None:
            from torch.utils.data import default_collate

            return default_collate(items)
        return self.collate(items)


# ---------------------------------------------------------------------------------------------- gradients
def sum_gradients(params: Sequence[torch.Tensor], extra: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``params`` over the processes, in place, and return ``extra`` (a small float vector,
    e.g. the weighted loss) summed the same way. A parameter without a gradient in any process keeps none (the
    optimiser then skips it, as it would in one process); one with a gradient somewhere gets the sum everywhere."""
    if world_size() == 1:
        return extra
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=extra.device)
    header = sum_over_processes(torch.cat([extra.float().reshape(-1), has_grad]))
    summed_extra, anywhere = header[: extra.numel()], header[extra.numel():] > 0
    chosen = [p for p, used in zip(params, anywhere.tolist()) if used]
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(chosen):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    return summed_extra.to(extra.dtype)


def _buckets(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.grad.dtype != bucket[0].grad.dtype
                       or p.grad.device != bucket[0].grad.device):  # fmt: skip
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
