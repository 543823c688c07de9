"""LoRA input dropout with a counter-based random number generator (CPU).

PEFT applies `dropout(x)` to the input of every adapted Linear: on a CPU, drawing that Bernoulli mask
from torch's sequential Mersenne-Twister generator takes longer than the LoRA matmuls themselves
(one draw per input element, on one core). `CounterDropout` draws the same distribution in parallel:

    key  ~ uniform 32-bit integer from torch's seeded generator (one draw per call)
    h_i  = mix32(mix32(i) XOR key)          i = 0 … n−1, the element's position (a counter)
    keep_i = (h_i XOR 2³¹) ≥ ⌊p · 2³²⌋      (unsigned) P(keep) = 1 − p, to within 2⁻³²
    y_i  = x_i · keep_i / (1 − p)           E[y] = x, as nn.Dropout

mix32 is the `lowbias32` integer finaliser (Wellons, 2018): a bijection on 32-bit words whose output
bits each flip with probability ≈ ½ when any input bit flips. Counter-based generators (Philox on CUDA,
threefry in JAX) work the same way: a keyed hash of the position. Masks are reproducible from torch's
seed, and a resumed run (which restores torch's generator state) draws the same keys. On CUDA, and in
eval mode, it is nn.Dropout.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}  # mix32(0 … n−1) as int32, grown on demand, per device


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (wrapping multiplies, logical shifts): returns `x`.

    Equal, bit for bit, to the 32-bit unsigned reference
        x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    with each word read as two's-complement int32.
    """
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= -0x7B935975  # 0x846ca68b as int32
    x ^= (x >> 16) & 0xFFFF
    return x


def _counters(n: int, device: torch.device) -> torch.Tensor:
    table = _COUNTERS.get(device)
    if table is None or table.numel() < n:
        table = mix32_(torch.arange(max(n, 1 << 20), dtype=torch.int32, device=device))
        _COUNTERS[device] = table
    return table[:n]


def keep_mask(shape: torch.Size, p: float, key: int, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask of `shape`: element i is kept iff (mix32(mix32(i) ^ key) ^ 2³¹) ≥ ⌊p · 2³²⌋.

    (Words unsigned; XOR 2³¹ maps int32's order onto the unsigned one, so one signed compare does it.)
    """
    n = shape.numel()
    h = mix32_(_counters(n, device) ^ key)  # (n,) int32, uniform over all 2³² words
    threshold = int(p * (1 << 32)) - (1 << 31)  # ⌊p · 2³²⌋ moved into int32's range
    return (h >= threshold).view(shape)


class CounterDropout(torch.nn.Module):
    """Drop-in nn.Dropout(p) whose CPU mask comes from `keep_mask` (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.numel() >= 1 << 31:
            return torch.nn.functional.dropout(x, self.p, training=True)
        key = int(torch.randint(-(1 << 31), 1 << 31, (1,), dtype=torch.int64))  # from torch's generator
        keep = keep_mask(x.shape, self.p, key, x.device)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}, rng=counter"


def use_counter_dropout(model: torch.nn.Module) -> int:
    """Swap each nn.Dropout of PEFT LoRA layers (`lora_dropout`) for CounterDropout; returns how many."""
    count = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                table[name] = CounterDropout(dropout.p)
                count += 1
    return count
