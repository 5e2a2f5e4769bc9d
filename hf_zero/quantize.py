"""Blockwise int8 quantization of what crosses the wire (ZeRO++ qwZ / qgZ style).

Pure tensor math, no process group: `comm` packs a tensor before a collective and unpacks what
arrives. Only communication is quantized: the fp32 master weights, the optimizer state and the
gradient shards a rank keeps never are.

Wire format of one piece of n elements (`pack`): ceil(n / block_size) fp32 scales, then n int8
values, as one uint8 buffer of `packed_numel(n, block_size)` bytes (padded to a multiple of 4,
so pieces laid end to end keep their scales 4-byte aligned). Each block of block_size
consecutive elements (the last one may be shorter) is scaled by its own absolute maximum:
scale = absmax / 127, q = round(x / scale), so every element is off by at most scale / 2 =
absmax / 254 of its block. fp32 against int8 plus one fp32 scale per 256 elements is
4 / (1 + 4/256) = 3.94x fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantSpec", "packed_numel", "pack", "unpack", "max_error"]

QMAX = 127


@dataclass(frozen=True)
class QuantSpec:
    """What `ZeroConfig.comm_quantization` asks for, as the comm layer reads it."""

    params: bool
    """Stage 3: the parameter all-gather sends int8."""
    grads: bool
    """Stages 2-3: the gradient reduce-scatter sends int8 (reduced in fp32 on the receiver)."""
    block_size: int

    @classmethod
    def from_config(cls, setting: dict | None) -> QuantSpec | None:
        if not setting:
            return None
        return cls(
            params=setting.get("params") == "int8",
            grads=setting.get("grads") == "int8",
            block_size=int(setting.get("block_size", 256)),
        )


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def packed_numel(n: int, block_size: int) -> int:
    """Bytes of one packed piece of n elements: the fp32 scales and n int8 values, padded to a
    multiple of 4."""
    return 4 * _blocks(n, block_size) + -(-n // 4) * 4


def pack(x: torch.Tensor, block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize 1D `x` (any float dtype) into `out` (uint8, `packed_numel` bytes; allocated when
    None) and return it."""
    n = x.numel()
    nb = _blocks(n, block_size)
    if out is None:
        out = torch.empty(packed_numel(n, block_size), dtype=torch.uint8, device=x.device)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    padded[:n].copy_(x)
    blocks = padded.view(nb, block_size)
    scales = blocks.abs().amax(dim=1) / QMAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    s = 4 * nb
    out[:s].copy_(scales.view(torch.uint8))
    out[s : s + n].copy_(q.view(-1)[:n].view(torch.uint8))
    out[s + n :].zero_()
    return out


def unpack(buf: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """The fp32 values (1D, n) of a piece packed by `pack`."""
    nb = _blocks(n, block_size)
    s = 4 * nb
    scales = buf[:s].view(torch.float32)
    q = buf[s : s + n].view(torch.int8).to(torch.float32)
    pad = nb * block_size - n
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    return (q.view(nb, block_size) * scales[:, None]).view(-1)[:n]


def max_error(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The bound on |unpack(pack(x)) - x| per element: half a quantization step of its block."""
    n = x.numel()
    nb = _blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    padded[:n].copy_(x)
    step = padded.view(nb, block_size).abs().amax(dim=1) / QMAX
    return (step / 2).repeat_interleave(block_size)[:n]
