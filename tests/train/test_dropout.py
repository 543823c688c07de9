"""CounterDropout: the hash is the published lowbias32, the mask has the right law, the layer is dropout."""

from __future__ import annotations

import pytest
import torch

from medmerge.train.dropout import CounterDropout, keep_mask, mix32_, use_counter_dropout

MASK32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The reference finaliser on unsigned 32-bit Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def test_mix32_equals_the_unsigned_reference_bit_for_bit() -> None:
    words = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, *range(1000, 1010)]
    signed = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
    got = [v & MASK32 for v in mix32_(signed.clone()).tolist()]
    assert got == [lowbias32(w) for w in words]


def test_keep_mask_equals_its_definition() -> None:
    p, key = 0.3, -123456789
    mask = keep_mask(torch.Size([4, 25]), p, key, torch.device("cpu"))
    expected = [
        ((lowbias32(lowbias32(i) ^ (key & MASK32)) ^ 0x80000000) >= int(p * 2**32)) for i in range(100)
    ]
    assert mask.flatten().tolist() == expected


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_law(p: float) -> None:
    """P(keep) = 1 − p; masks of two keys, and neighbouring positions, are independent."""
    n = 1 << 20
    a = keep_mask(torch.Size([n]), p, 17, torch.device("cpu"))
    b = keep_mask(torch.Size([n]), p, 18, torch.device("cpu"))
    tol = 6 * (p * (1 - p) / n) ** 0.5  # six standard errors
    assert abs(a.double().mean().item() - (1 - p)) < tol
    assert abs((~a & ~b).double().mean().item() - p * p) < 6 * (p * p / n) ** 0.5 + 1e-4
    assert abs((~a[1:] & ~a[:-1]).double().mean().item() - p * p) < 6 * (p * p / n) ** 0.5 + 1e-4
    assert not torch.equal(a, b)


def test_counter_dropout_is_dropout() -> None:
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = CounterDropout(0.25)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors scaled by 1 / (1 − p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)  # gradient flows through kept entries only
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)  # the mask comes from torch's seeded generator
    assert not torch.equal(layer(x), y)  # and a new call draws a new key
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CounterDropout(1.0)


def test_peft_dropout_is_replaced(tiny_llama) -> None:
    from peft import LoraConfig, get_peft_model

    from medmerge.models import load_model

    config = LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    model = get_peft_model(load_model(tiny_llama), config)
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert use_counter_dropout(model) == len(layers) > 0
    assert all(isinstance(m.lora_dropout["default"], CounterDropout) for m in layers)
