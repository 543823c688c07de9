"""The arithmetic of a secure sum: quantization, the mask PRG, masking at a site, unmasking centrally.

Quantization (per tensor, clipping range c, L levels, modulus M = 2^b):
    Q(x) = round(clip(w·x, −c, c) · L/(2c)) ∈ [−L/2, L/2], an integer (round half to even),
    stored as Q mod M. A sum of K ≤ N sites' Q lies in [−K·L/2, K·L/2] ⊂ (−M/2, M/2) when N·L < M, so the
    integer sum is recovered exactly from the sum mod M, and Σ w·x ≈ (Σ Q) · Δ with Δ = 2c/L.
    Error: each site's rounding is ≤ Δ/2 per entry (when |w·x| ≤ c), so |Σ̂ − Σ w·x| ≤ K·Δ/2.
    `simulate_sum` runs exactly this arithmetic (same functions, no masks), so a merge's sensitivity to
    the bit width can be measured before any round; `sum_tolerance` gives K·Δ/2 per tensor.

Masks: PRG(seed) is the AES-256-CTR keystream under the 32-byte seed (`cryptography`), read as
little-endian uint64 and reduced mod M (exactly uniform, M being a power of two). Flower's
`pseudo_rand_gen` is not used: it folds the seed to 32 bits for numpy's Mersenne Twister, so each mask
would come from one of 2^32 seeds, within a coordinator's reach to enumerate.

Every pass runs over chunks of CHUNK entries, so beyond the input and the output a site or coordinator
holds a few chunk buffers (a few MB) whatever the vector's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from medmerge.errors import MedmergeError
from medmerge.federated.secagg_records import SetupRequest, TensorSpec

CHUNK = 1 << 18


class MaskStream:
    """PRG(seed): consecutive uint64 draws of the AES-256-CTR keystream under `seed` (32 bytes)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise MedmergeError(f"mask seed: expected 32 bytes, got {len(seed)}")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(CHUNK * 8))
        self._buf = bytearray(CHUNK * 8 + 15)  # update_into needs room for one block more

    def take(self, n: int) -> np.ndarray:
        """The next n draws (n ≤ CHUNK), as a uint64 view valid until the next call."""
        self._enc.update_into(self._zeros[: n * 8], self._buf)
        return np.frombuffer(self._buf, dtype="<u8", count=n)


def _quantize_into(x: np.ndarray, scale: float, half: int, buf: np.ndarray, out: np.ndarray) -> int:
    """out (uint64) ← Q(x) mod 2^64 with Q = round(clip(x·scale, ±half)); returns how many were clipped.
    `buf` is float64 scratch of x's length: the product is formed in float64 (L may exceed 2^24)."""
    buf[...] = x
    buf *= scale
    if not np.isfinite(buf).all():
        raise MedmergeError("secure sum: the vector holds NaN or infinite values")
    clipped = int(np.count_nonzero(np.abs(buf) > half))
    np.clip(buf, -half, half, out=buf)
    np.rint(buf, out=buf)
    np.copyto(out.view(np.int64), buf, casting="unsafe")
    return clipped


def _chunks(setup: SetupRequest, tensors: Sequence[np.ndarray]):
    """(spec, flat slice) for each chunk of the vector, in layout order."""
    for spec, tensor in zip(setup.layout, tensors, strict=True):
        flat = tensor.reshape(-1)
        for start in range(0, flat.size, CHUNK):
            yield spec, flat[start : start + CHUNK]


def ordered(setup: SetupRequest, tensors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The site's tensors in layout order, after checking names, shapes and dtype against the layout."""
    if set(tensors) != {s.name for s in setup.layout}:
        missing = sorted({s.name for s in setup.layout} - set(tensors))
        extra = sorted(set(tensors) - {s.name for s in setup.layout})
        raise MedmergeError(f"secure sum: tensors differ from the layout (missing {missing}, extra {extra})")
    out = []
    for spec in setup.layout:
        t = np.asarray(tensors[spec.name])
        if t.shape != spec.shape or t.dtype.kind != "f":
            raise MedmergeError(
                f"secure sum: tensor {spec.name} is {t.dtype}{t.shape}, layout says float{spec.shape}"
            )
        out.append(t)
    return out


def mask(
    setup: SetupRequest,
    tensors: Sequence[np.ndarray],
    weight: float,
    self_seed: bytes | None,
    pair_seeds: Sequence[tuple[bytes, int]],
) -> tuple[bytes, int]:
    """y = Q(w·x) + PRG(self_seed) (none when None) + Σ sign·PRG(seed) mod 2^bits, as little-endian bytes of
    `setup.itemsize`; and the number of entries that were clipped (for the site's own log)."""
    dtype = np.dtype("<u4" if setup.itemsize == 4 else "<u8")
    out = np.empty(setup.elements, dtype=dtype)
    seeds = ([(self_seed, 1)] if self_seed is not None else []) + list(pair_seeds)
    streams = [(MaskStream(seed), sign) for seed, sign in seeds]
    buf, acc = np.empty(CHUNK, np.float64), np.empty(CHUNK, np.uint64)
    modmask = np.uint64(2**setup.modulus_bits - 1)
    pos = clipped = 0
    for spec, part in _chunks(setup, tensors):
        n = part.size
        scale = weight * setup.levels / (2 * spec.clip)
        clipped += _quantize_into(part, scale, setup.levels // 2, buf[:n], acc[:n])
        for stream, sign in streams:
            (np.add if sign > 0 else np.subtract)(acc[:n], stream.take(n), out=acc[:n])
        np.bitwise_and(acc[:n], modmask, out=acc[:n])
        out[pos : pos + n] = acc[:n]
        pos += n
    return out.tobytes(), clipped


class Accumulator:
    """Σ y_u mod 2^64 over the masked vectors received, then the masks' removal and the dequantization."""

    def __init__(self, setup: SetupRequest) -> None:
        self.setup = setup
        self.total = np.zeros(setup.elements, dtype=np.uint64)

    def add(self, vector: bytes) -> None:
        s = self.setup
        if len(vector) != s.elements * s.itemsize:
            raise MedmergeError(f"masked vector: {len(vector)} bytes, expected {s.elements * s.itemsize}")
        y = np.frombuffer(vector, dtype="<u4" if s.itemsize == 4 else "<u8")
        for start in range(0, y.size, CHUNK):
            part = self.total[start : start + CHUNK]
            np.add(part, y[start : start + CHUNK], out=part, casting="unsafe")

    def unmask(self, streams: Sequence[tuple[bytes, int]]) -> dict[str, np.ndarray]:
        """Subtract sign·PRG(seed) for each (seed, sign), reduce mod 2^bits to the signed integer sum
        ((t + M/2) mod M) − M/2, and return Σ w·x = sum × Δ per tensor (float64, in place of the
        accumulator)."""
        s = self.setup
        gens = [(MaskStream(seed), sign) for seed, sign in streams]
        half, modmask = np.uint64(2 ** (s.modulus_bits - 1)), np.uint64(2**s.modulus_bits - 1)
        out, buf = self.total.view(np.float64), np.empty(CHUNK, np.uint64)
        result, pos = {}, 0
        for spec in s.layout:
            step = s.step(spec)
            for start in range(pos, pos + spec.size, CHUNK):
                n = min(CHUNK, pos + spec.size - start)
                buf[:n] = self.total[start : start + n]
                for gen, sign in gens:
                    (np.subtract if sign > 0 else np.add)(buf[:n], gen.take(n), out=buf[:n])
                np.add(buf[:n], half, out=buf[:n])
                np.bitwise_and(buf[:n], modmask, out=buf[:n])
                signed = buf[:n].view(np.int64) - np.int64(half)
                np.multiply(signed, step, out=out[start : start + n])
            result[spec.name] = out[pos : pos + spec.size].reshape(spec.shape)
            pos += spec.size
        del self.total
        return result


def sum_tolerance(setup: SetupRequest, sites: int) -> dict[str, float]:
    """Per tensor, the largest |secure sum − Σ w·x| quantization allows (inputs within ±c): sites × Δ/2,
    plus 2^-7 of it for float64 rounding of w·x·L/(2c) (≤ 3 ulp of a value ≤ 2^43, i.e. ≤ 3·2^-10 Δ)."""
    return {spec.name: sites * setup.step(spec) / 2 * (1 + 2**-7) for spec in setup.layout}


def simulate_sum(setup: SetupRequest, contributions: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """Σ_u w_u x_u exactly as a secure round over the sites `contributions` names would return it
    (same quantization, same modular sum, same dequantization; masks cancel, so none are drawn):
    what the `stats` side uses to choose levels/modulus by the merge's error before running a round."""
    acc = Accumulator(setup)
    for site, tensors in contributions.items():
        y, _ = mask(setup, ordered(setup, tensors), setup.weight(site), None, [])
        acc.add(y)
    return acc.unmask([])


def spec_for(name: str, tensor: np.ndarray, clip: float) -> TensorSpec:
    """A layout entry for `tensor` (convenience for callers building a SetupRequest)."""
    return TensorSpec(name=name, shape=tuple(int(d) for d in tensor.shape), clip=float(clip))
