"""The tensor names `save_pretrained` writes for a model, and where each one comes from.

`save_pretrained` (transformers 5) takes the model's state dict, drops the tied copies the model
class re-ties on load (GPT-2 writes no `lm_head.weight`), then reverts the weight conversions
`from_pretrained` applies (`revert_weight_conversion`). A conversion is either a rename (GPT-NeoX
writes `embed_out.weight` for the model's `lm_head.weight`) or a change of values (Mixtral's fused
`experts.gate_up_proj` is split back into one tensor per expert).

`export_keys` runs those same two functions on meta tensors, so nothing is allocated, and tells
the two kinds apart by identity: a tensor that comes back as the very object that went in was
renamed (or kept); any other tensor was computed, and that is a conversion an export that copies
tensors cannot reproduce. The export follows renames and refuses conversions, saying which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ExportNames", "export_keys"]


@dataclass(frozen=True)
class ExportNames:
    """What `save_pretrained` writes for a model."""

    keys: tuple[str, ...]
    """The tensor names it writes, in its order (which decides its shard split). Where it
    converts values, the model's own names instead (the export is refused then)."""

    renames: dict[str, str] = field(default_factory=dict)
    """Written name -> the model's state-dict name, where they differ."""

    conversion: str | None = None
    """What it does to values beyond renaming; None when it only renames."""

    def source(self, key: str) -> str:
        return self.renames.get(key, key)


def export_keys(module: nn.Module) -> ExportNames:
    """The names `module.save_pretrained` writes, the renames among them, and any conversion of
    values it makes (see the module docstring). A module that is not a transformers model
    writes its state dict as it is."""
    meta = {
        k: torch.empty(v.shape, device="meta") for k, v in module.state_dict(keep_vars=True).items()
    }
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import (
            remove_tied_weights_from_state_dict,
            revert_weight_conversion,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ExportNames(tuple(meta))
    if not isinstance(module, PreTrainedModel):
        return ExportNames(tuple(meta))
    kept = remove_tied_weights_from_state_dict(meta, module)
    written = revert_weight_conversion(module, dict(kept))
    name_of = {id(t): k for k, t in kept.items()}
    renames, computed = {}, []
    for key, tensor in written.items():
        source = name_of.get(id(tensor))
        if source is None:
            computed.append(key)
        elif source != key:
            renames[key] = source
    used = {name_of[id(t)] for t in written.values() if id(t) in name_of}
    dropped = [k for k in kept if k not in used]
    if computed or dropped:
        return ExportNames(tuple(kept), conversion=_describe(module, computed, dropped))
    return ExportNames(tuple(written), renames)


def _describe(module: nn.Module, computed: list[str], dropped: list[str]) -> str:
    """One sentence: which tensors save_pretrained computes, and by which conversions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        steps = [
            f"{' + '.join(c.target_patterns)} -> {' + '.join(c.source_patterns)} "
            f"({', '.join(type(op).__name__ for op in getattr(c, 'operations', []))})"
            for c in get_model_conversion_mapping(module, add_legacy=False)
            if isinstance(c, WeightConverter)
        ]
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other transformers
        steps = []
    what = f"writes {len(computed)} tensors that are not model tensors renamed"
    if computed:
        what += f" (e.g. {computed[0]!r})"
    if dropped:
        what += f" and leaves out {len(dropped)} of the model's (e.g. {dropped[0]!r})"
    how = f", reverting transformers' weight conversion {'; '.join(steps)}" if steps else ""
    return f"save_pretrained {what}{how}"
