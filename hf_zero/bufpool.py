"""Reusable memory for stage 3's gathered units (and stage 1's reduce-scatter scratch).

A unit's full flat buffer is gathered before its forward and backward and released after. If
every gather allocated fresh memory and every release freed it, the CPU allocator would hand
the pages back to the kernel (large blocks are mmapped) and the next gather would fault them in
again: gigabytes of page faults per step for a 124M-parameter model. The pool keeps the released
blocks and hands them to the next unit of the same size instead.

Invariants:
  - A full buffer's storage (`torch.UntypedStorage`) keeps its identity for the whole run: the
    parameters, and every tensor autograd saved in forward, are views of it. Only the memory
    behind it moves: `acquire` swaps a pooled block into the empty storage, `release` swaps it
    back out, leaving the storage 0 bytes as before. No bytes are copied.
  - Blocks are keyed by (device, nbytes): units of equal size share them (the repeated blocks of
    a transformer are all one size), across units and across steps.
  - At most `capacity` idle blocks are kept per size: the number of units of one size alive at
    once (the gathered unit, the prefetched next one, and one waiting for release), so the pool
    holds what the peak held anyway and never adds to the peak. A block released beyond that is
    freed.
  - Within a backward pass, the pool knows how many more blocks of each size the pass will ask
    for (`begin_pass`: the gathers of its sequence and the gradient buckets packed into them).
    Once the last one is taken, the idle blocks of that size are freed, and so is every block
    of it released later in the pass: they would only wait for the next forward, through the
    end of backward, where memory peaks (the embedding's gradient). The pass ends when it has
    taken all it asked for (the last unit's gradient bucket) or when backward ends: what is
    given back from then on is kept. The next forward faults in the two blocks it gathers
    first (the first unit and its prefetched successor); later gathers reuse.
  - Idle blocks are memory this rank holds; `idle_bytes()` says how much, and the engine
    reports it beside the model states (`memory_stats()["pooled_buffer_bytes"]`).

torch before 2.13 cannot move memory between storages (no `_swap_data_ptr_`). There `acquire`
and `release` resize the storage instead (fresh memory at every gather, as before the pool; on
CUDA the caching allocator recycles it) and the pool keeps nothing. hf_zero needs torch 2.13;
the fallback lets the CUDA tests run on GPU images that ship an older torch.
"""

from __future__ import annotations

import torch

__all__ = ["GatherPool"]

_SWAP = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


class GatherPool:
    """Idle gather buffers by size; `acquire` / `release` move memory in and out of a storage."""

    def __init__(self, *, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 idle block per size, got {capacity}")
        self.capacity = capacity
        self._idle: dict[tuple[torch.device, int], list[torch.UntypedStorage]] = {}
        self.allocated = 0  # blocks created since start: the pool's misses
        # In a backward pass: blocks of each size still to be asked for (see `begin_pass`).
        self._demand: dict[int, int] | None = None

    def begin_pass(self, demand: dict[int, int]) -> None:
        """A backward pass starts that will acquire `demand[nbytes]` blocks of each size
        (an estimate: more are served as usual, fewer leave blocks idle as outside a pass)."""
        self._demand = dict(demand)

    def end_pass(self) -> None:
        """The pass is over: released blocks are kept again, up to `capacity` per size."""
        self._demand = None

    def _needed(self, nbytes: int) -> bool:
        return self._demand is None or self._demand.get(nbytes, 0) > 0

    def acquire(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Give the empty `storage` `nbytes` of memory: an idle block of that size, or a new one.
        Its contents are undefined (the caller overwrites them)."""
        assert storage.nbytes() == 0, "acquire into a storage that still holds memory"
        if not _SWAP:
            storage.resize_(nbytes)
            self.allocated += 1
            return
        key = (storage.device, nbytes)
        idle = self._idle.get(key)
        if idle:
            block = idle.pop()
        else:
            block = torch.UntypedStorage(nbytes, device=storage.device)
            self.allocated += 1
        storage._swap_data_ptr_(block)  # `block` is now the empty shell
        if self._demand is not None and nbytes in self._demand:
            self._demand[nbytes] -= 1
            if not self._needed(nbytes):
                self._idle.pop(key, None)  # nothing of this size is asked for again this pass
            if not any(n > 0 for n in self._demand.values()):
                self.end_pass()  # it took all it asked for: what it gives back now is kept

    def release(self, storage: torch.UntypedStorage) -> None:
        """Take the memory out of `storage` (left 0 bytes) and keep it for the next acquire."""
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        if not _SWAP:
            storage.resize_(0)
            return
        block = torch.UntypedStorage(0, device=storage.device)
        block._swap_data_ptr_(storage)
        idle = self._idle.setdefault((block.device, nbytes), [])
        if len(idle) < self.capacity and self._needed(nbytes):
            idle.append(block)
        # else: `block` goes out of scope here and its memory is freed

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1D tensor of `numel` elements on a pooled block (contents undefined): stage 3's
        gradient buckets pack into the block their unit's parameters just gave back."""
        storage = torch.UntypedStorage(0, device=device)
        self.acquire(storage, numel * dtype.itemsize)
        return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (numel,))

    def give(self, t: torch.Tensor) -> None:
        """Return the block behind a tensor from `take`; the caller must not use `t` again."""
        self.release(t.untyped_storage())

    def idle_bytes(self) -> int:
        """Bytes held in idle blocks."""
        return sum(b.nbytes() for blocks in self._idle.values() for b in blocks)

    def clear(self) -> None:
        """Free every idle block."""
        self._idle.clear()
