"""Activation (gradient) checkpointing under the engine: which variant works, and the refusal.

Transformers' `model.gradient_checkpointing_enable()` wraps each block's `forward` (not its
`__call__`) in `torch.utils.checkpoint.checkpoint`, so the engine's module hooks stay outside
the checkpoint and run once per forward. The non-reentrant variant (`use_reentrant=False`, the
transformers default) recomputes a block inside the one backward pass that reached it:
- stages 0-2: the parameters are replicated, the gradient hooks fire as without checkpointing;
- stage 3: the gradient reaching the block's output gathers the unit (`params.ShardedParams`,
  in the backward sequence every rank walks), the recompute reads the gathered parameters, and
  the unit is released once its gradients are done, as without checkpointing.

The reentrant variant (`use_reentrant=True`) runs each block's backward as a nested
`torch.autograd.backward` call: the engine's end-of-backward work would run at the end of the
first nested pass and reduce half-made gradients. It is refused, by `check_no_reentrant`, at
`initialize` and at every training forward.
"""

from __future__ import annotations

import functools

from torch import nn

__all__ = ["check_no_reentrant", "reentrant_modules"]


def _is_reentrant(func) -> bool:
    if isinstance(func, functools.partial):
        # torch.utils.checkpoint's own default, when the keyword is missing, is reentrant.
        return bool(func.keywords.get("use_reentrant", True))
    return func is not None


def reentrant_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that checkpoint their forward with the reentrant
    variant (transformers' `gradient_checkpointing` flag and `_gradient_checkpointing_func`)."""
    return [
        name
        for name, m in model.named_modules()
        if getattr(m, "gradient_checkpointing", False) is True
        and _is_reentrant(getattr(m, "_gradient_checkpointing_func", None))
    ]


def check_no_reentrant(model: nn.Module) -> None:
    """Raise if `model` checkpoints activations with the reentrant variant.

    Raises:
        ValueError: some module has reentrant gradient checkpointing enabled; the message names
            it and the fix.
    """
    names = reentrant_modules(model)
    if names:
        shown = ", ".join(repr(n or "<root>") for n in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise ValueError(
            f"gradient checkpointing with use_reentrant=True is enabled on {shown}{more}: its "
            "nested backward passes would make hf_zero reduce the gradients before backward is "
            "done. Use the non-reentrant variant: model.gradient_checkpointing_enable("
            'gradient_checkpointing_kwargs={"use_reentrant": False}) (the transformers default; '
            'with the Trainer, gradient_checkpointing_kwargs={"use_reentrant": False})'
        )
