"""Sparse embedding gradients: reduce only the rows some rank looked up. Exact.

A batch touches a few hundred rows of a 30k-row word embedding; every other row's gradient is
exactly zero on every rank, so the sum over ranks of the touched rows alone is the whole sum.
The optimizer still updates every row (weight decay, Adam's moments): only the wire changes.

Which embeddings (`lookup_only_embeddings`): an `nn.Embedding` whose weight
- trains, with `sparse=False` and `max_norm=None` (a max_norm lookup rewrites rows in forward);
- has one name only (no tied alias: GPT-2's `wte` is also `lm_head.weight`, whose gradient is
  dense) and is not the model's output embeddings;
- has at least 3 rows (a reduce-scatter of V rows costs V, an all-reduce of K rows 2K: fewer
  than 3 rows never gain).
Each gets a flat unit of its own (`ParamEntry.solo`), so its reduction is replaced whole and
every other flat unit is reduced as before.

Per reduction of such a flat unit (`SparseRows.exchange`, called by a gradient store where it
would reduce that unit):
  1. forward: a pre-hook on the embedding records the ids it looks up while grad is enabled;
  2. this rank's rows are the unique recorded ids, and it proves them: every other row of its
     local gradient is exactly zero (its nonzeros all lie in those rows: one counting pass).
     A weight also used outside the lookup fails the proof;
  3. `comm.all_gather_row_ids`: every rank's (count, proven) and ids; the union U, the same on
     every rank, so every rank takes the same branch;
  4. every rank proven and the all-reduce of U's rows (2·|U|·D elements) cheaper than the
     dense reduction: the store all-reduces the packed rows (`reduce_rows`, counted as
     "sparse_rows") and writes them back where the dense sum would land. Otherwise the store's
     dense reduction runs, counted in `CommStats.reductions` as "dense" or "dense_unproven"
     (after which that embedding stays dense, with a warning).
Rows are recorded since `clear`: the full-gradient stores (stages 0-1) clear at `zero()`, since
their buffers hold everything since; the sharded stores (stages 2-3) after each reduction.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import comm
from .partition import FROZEN, Layout, ParamEntry

__all__ = ["RowsReduction", "SparseRows", "add_rows_to_shard", "lookup_only_embeddings"]

MIN_ROWS = 3


def lookup_only_embeddings(model: nn.Module, entries: list[ParamEntry]) -> dict[str, nn.Embedding]:
    """Primary parameter name -> embedding module, for the weights used by lookup only (see the
    module docstring for the rules)."""
    by_name = {e.name: e for e in entries}
    out_weight = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_weight = getattr(get_out(), "weight", None)
        except (NotImplementedError, AttributeError):
            out_weight = None
    found: dict[str, nn.Embedding] = {}
    for mname, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        name = f"{mname}.weight" if mname else "weight"
        entry = by_name.get(name)
        w = module.weight
        if (
            entry is None  # an alias of a parameter registered first elsewhere
            or entry.aliases
            or entry.group == FROZEN
            or w is out_weight
            or not w.requires_grad
            or module.sparse
            or module.max_norm is not None
            or w.dim() != 2
            or module.num_embeddings < MIN_ROWS
        ):
            continue
        found[name] = module
    return found


def mark_solo(entries: list[ParamEntry], names: set[str]) -> list[ParamEntry]:
    """The entries with the sparse embeddings flagged to get flat units of their own."""
    return [
        ParamEntry(e.name, e.shape, e.unit, e.group, e.aliases, solo=True) if e.name in names else e
        for e in entries
    ]


class RowsReduction:
    """One sparse all-reduce in flight; `wait()` lands it and writes the summed rows."""

    __slots__ = ("pending", "packed", "write", "done")

    def __init__(self, pending: comm.Pending, packed: torch.Tensor, write: Callable):
        self.pending, self.packed, self.write, self.done = pending, packed, write, False

    def is_completed(self) -> bool:
        return self.done or self.pending.is_completed()

    def wait(self) -> None:
        if not self.done:
            self.pending.wait()
            self.write(self.packed)
            self.done = True


class SparseRows:
    """The sparse embeddings of one engine: their flat units, recorded rows and decisions."""

    def __init__(
        self,
        layout: Layout,
        embeddings: dict[str, nn.Embedding],
        *,
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
    ):
        self.group, self.stats = group, stats
        self.flats: dict[int, tuple[str, int, int]] = {}  # flat index -> (name, rows, dim)
        for fu in layout.flat_units:
            if len(fu.params) == 1 and fu.params[0].name in embeddings:
                rows, dim = fu.params[0].shape
                self.flats[fu.index] = (fu.params[0].name, rows, dim)
        self._seen: dict[int, list[torch.Tensor]] = {i: [] for i in self.flats}
        self._dense_for_good: set[int] = set()
        self._hooks = []
        index_of = {name: i for i, (name, _, _) in self.flats.items()}
        for name, module in embeddings.items():
            if name in index_of:
                self._hooks.append(
                    module.register_forward_pre_hook(
                        self._recorder(index_of[name]), with_kwargs=True
                    )
                )

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            if torch.is_grad_enabled() and module.weight.requires_grad:
                ids = args[0] if args else kwargs["input"]
                self._seen[index].append(torch.unique(ids.detach().reshape(-1)))

        return hook

    def handles(self, index: int) -> bool:
        return index in self.flats and index not in self._dense_for_good

    def clear(self, index: int | None = None) -> None:
        for i in [index] if index is not None else list(self._seen):
            self._seen[i].clear()

    def _local_rows(self, index: int, device: torch.device) -> torch.Tensor:
        seen = self._seen[index]
        if not seen:
            return torch.zeros(0, dtype=torch.int64, device=device)
        rows = torch.unique(torch.cat(seen)).to(device=device, dtype=torch.int64)
        self._seen[index] = [rows]
        return rows

    def exchange(
        self, index: int, grad: torch.Tensor | None, *, dense_bytes: int, element_size: int
    ) -> torch.Tensor | None:
        """Phases 2-4: the union of the touched rows (1D int64, sorted) when the sparse
        reduction is exact and cheaper than `dense_bytes`, else None (reduce densely).
        `grad`: this rank's local gradient (rows x dim), None when it got none. Collective."""
        name, rows, dim = self.flats[index]
        device = grad.device if grad is not None else torch.device("cpu")
        local = self._local_rows(index, device)
        proven = True
        if grad is not None:
            # Nonzeros outside the recorded rows: all of them less those inside (one pass; a
            # per-row count is several times slower on CPU).
            g = grad.reshape(rows, dim)
            inside = torch.count_nonzero(g.index_select(0, local)) if local.numel() else 0
            proven = int(torch.count_nonzero(g)) == int(inside)
        union, all_proven = comm.all_gather_row_ids(
            local,
            proven,
            group=self.group,
            stats=self.stats,
            label=f"row-id all-gather of sparse embedding {name!r} (backward)",
        )
        if not all_proven:
            self.stats.count_reduction("dense_unproven")
            self._dense_for_good.add(index)
            warnings.warn(
                f"hf_zero: embedding {name!r} has gradient outside the rows it looked up (its "
                "weight is used by more than the lookup); its gradient is reduced densely from "
                "now on. ZeroConfig(sparse_embedding_grads=False) skips the check",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if 2 * union.numel() * dim * element_size >= dense_bytes:
            self.stats.count_reduction("dense")
            return None
        self.stats.count_reduction("sparse")
        return union

    def reduce_rows(
        self,
        index: int,
        grad: torch.Tensor | None,
        union: torch.Tensor,
        write: Callable[[torch.Tensor], None],
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> RowsReduction:
        """Start the all-reduce of the rows `union` of `grad` (zeros where None); `write`
        receives the summed rows (|union| x dim) when it is waited on."""
        name, rows, dim = self.flats[index]
        if grad is None:
            packed = torch.zeros(union.numel(), dim, dtype=dtype, device=device)
        else:
            packed = grad.reshape(rows, dim).index_select(0, union)
        pending = comm.all_reduce(
            packed,
            group=self.group,
            stats=self.stats,
            async_op=True,
            label=f"sparse row all-reduce of embedding {name!r} (backward)",
            kind="sparse_rows",
        )
        return RowsReduction(pending, packed, write)

    def launch_full(
        self, index: int, flat: torch.Tensor, *, dense_bytes: int
    ) -> RowsReduction | None:
        """Stages 0-1: the sparse reduction of a full local gradient buffer (1D, padded); the
        summed rows overwrite the buffer's (every other row is zero on every rank). None when
        the dense reduction must run."""
        rows, dim = self.rows_of(index)
        grad = flat[: rows * dim].view(rows, dim)
        union = self.exchange(
            index, grad, dense_bytes=dense_bytes, element_size=flat.element_size()
        )
        if union is None:
            return None
        return self.reduce_rows(
            index,
            grad,
            union,
            lambda summed: grad.index_copy_(0, union, summed),
            dtype=flat.dtype,
            device=flat.device,
        )

    def rows_of(self, index: int) -> tuple[int, int]:
        _, rows, dim = self.flats[index]
        return rows, dim


def add_rows_to_shard(
    shard: torch.Tensor, lo: int, union: torch.Tensor, summed: torch.Tensor, dim: int
) -> None:
    """Add the rows `union` (values `summed`, |union| x dim) of a row-major (rows x dim) flat
    to `shard`, which holds its flat elements [lo, lo + shard.numel())."""
    hi = lo + shard.numel()
    keep = (union * dim < hi) & ((union + 1) * dim > lo)
    if not bool(keep.any()):
        return
    rows, values = union[keep], summed[keep]
    pos = rows[:, None] * dim + torch.arange(dim, device=rows.device)
    inside = (pos >= lo) & (pos < hi)
    shard.index_add_(0, pos[inside] - lo, values[inside].to(shard.dtype))
