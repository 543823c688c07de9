"""The typed messages of one secure sum (SecAgg+, Bell et al. 2020), one request and one reply per stage.

Stages, as in Flower's `secaggplus_workflow` (setup → share keys → collect masked vectors → unmask),
here over medmerge's own records so that any transport can carry them:

    setup           coordinator → every participant   SetupRequest   the round's public parameters
                    participant → coordinator          SetupReply     its two fresh public keys
    share_keys      coordinator → participant u        ShareKeysRequest  its neighbours' public keys
                    u → coordinator                    ShareKeysReply    Fernet tokens, one per neighbour,
                                                                         holding Shamir shares of b_u, sk_u
    masked_vector   coordinator → u                    MaskedVectorRequest  the tokens addressed to u
                    u → coordinator                    MaskedVectorReply    y_u = Q(w_u x_u) + PRG(b_u)
                                                                            + Σ_v ±PRG(s_uv) mod 2^bits
    unmask          coordinator → survivor             UnmaskRequest  who survived, who dropped
                    survivor → coordinator             UnmaskReply    shares of b (survivors), sk (dropped)

Every record is a strict, frozen pydantic model: unknown keys, NaN/inf, wrong types, names outside
`^[A-Za-z0-9_-]+$` and oversized byte strings are refused at parsing. Bytes travel as base64 in JSON; a
transport with named blobs carries `MaskedVectorReply.vector` (the only large field) as a blob.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from medmerge.errors import MedmergeError

MIN_PARTICIPANTS = 3  # a 2-site sum gives each site the other's value by subtraction
MAX_PARTICIPANTS = 64
MAX_TENSORS = 4096
MAX_ELEMENTS = 250_000_000  # 2.0 GB as uint64: under gRPC's 2 GiB message limit
MAX_LEVELS = 2**44  # |x·L/2c| ≤ 2^43: float64 forms it within 2^-10 of a step, so rounding stays ≤ ~Δ/2
KEY_BYTES = 1024  # a PEM SECP384R1 public key is 215 bytes
TOKEN_BYTES = 4096  # a Fernet token of two shares (b: 52 bytes, sk: 324 bytes) is ~600 bytes
SHARE_BYTES = 1024

SiteName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$", min_length=1, max_length=64)]
TensorName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", min_length=1, max_length=256)
]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Key = Annotated[bytes, Field(min_length=1, max_length=KEY_BYTES)]
Token = Annotated[bytes, Field(min_length=1, max_length=TOKEN_BYTES)]
Share = Annotated[bytes, Field(min_length=5, max_length=SHARE_BYTES)]


class Record(BaseModel):
    """Base of every stage record: strict types, no unknown keys, immutable, bytes as base64 in JSON."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, ser_json_bytes="base64", val_json_bytes="base64"
    )


class TensorSpec(Record):
    """One named tensor of the summed vector, its shape, and its clipping range c: each site's w·x is
    clipped to [−c, c] and quantized with step Δ = 2c / levels."""

    name: TensorName
    shape: tuple[Annotated[int, Field(ge=1, le=MAX_ELEMENTS)], ...] = Field(min_length=1, max_length=4)
    clip: Finite = Field(gt=0, le=1e12)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class SetupRequest(Record):
    """The round's public parameters; every participant receives the same record and checks it.

    - participants: sorted, distinct, at least 3. A site's index (1-based position here) is its id in
      the share plaintexts and decides the sign of each pairwise mask (+ for the larger index).
    - neighbours k: how many others each site masks with and shares its secrets with (SecAgg+'s graph):
      k = N − 1 is the complete graph (SecAgg); an even k < N − 1 is a ring, ±k/2 places in this order.
    - threshold t: shares needed to rebuild a secret, out of the k + 1 holders (a site holds one share of
      its own secrets); more than half of them (so no two disjoint sets of honest sites can rebuild both a
      site's b and its sk), at least 2, at most k + 1. The sum needs ≥ max(3, t) survivors.
    - levels L (even) and modulus_bits b: Q(x) = round(clip(w·x, ±c) · L/(2c)) ∈ [−L/2, L/2], summed mod
      M = 2^b; the sum is recovered exactly while N · L < M (checked here).
    - weights: the public coefficient w_u each site multiplies its own vector by (all 1 when None).
    - mode: `secure` (no noise) or `secure+dp`: each site adds its share of Gaussian noise so that any
      accepted sum (≥ t survivors) carries noise of std noise_multiplier × the sum's sensitivity.
    """

    round_id: SiteName
    participants: tuple[SiteName, ...] = Field(min_length=MIN_PARTICIPANTS, max_length=MAX_PARTICIPANTS)
    threshold: int = Field(ge=2, le=MAX_PARTICIPANTS)
    neighbours: int = Field(ge=2, le=MAX_PARTICIPANTS - 1)
    levels: int = Field(ge=2, le=MAX_LEVELS)
    modulus_bits: int = Field(ge=8, le=64)
    layout: tuple[TensorSpec, ...] = Field(min_length=1, max_length=MAX_TENSORS)
    weights: dict[SiteName, Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]] | None = None
    mode: Literal["secure", "secure+dp"] = "secure"
    noise_multiplier: Finite | None = Field(default=None, gt=0, le=1e6)

    @model_validator(mode="after")
    def _consistent(self) -> SetupRequest:
        n, k, t = len(self.participants), self.neighbours, self.threshold
        if list(self.participants) != sorted(set(self.participants)):
            raise ValueError("participants must be sorted and distinct")
        if not (k == n - 1 or (k % 2 == 0 and k < n - 1)):
            raise ValueError(f"neighbours must be {n - 1} (all) or even and below it, got {k}")
        if not (k + 1) / 2 < t <= k + 1:
            raise ValueError(f"threshold must exceed half of the {k + 1} share holders and be ≤ {k + 1}")
        if self.levels % 2:
            raise ValueError("levels must be even")
        if n * self.levels >= 2**self.modulus_bits:
            raise ValueError(
                f"{n} sites × {self.levels} levels ≥ 2^{self.modulus_bits}: the sum would wrap around"
            )
        names = [s.name for s in self.layout]
        if len(set(names)) != len(names):
            raise ValueError("layout names must be distinct")
        if sum(s.size for s in self.layout) > MAX_ELEMENTS:
            raise ValueError(f"layout holds more than {MAX_ELEMENTS} elements")
        if self.weights is not None and set(self.weights) != set(self.participants):
            raise ValueError("weights must name exactly the participants")
        if (self.mode == "secure+dp") != (self.noise_multiplier is not None):
            raise ValueError("noise_multiplier is required with mode secure+dp, and only with it")
        return self

    def index(self, site: str) -> int:
        """The site's 1-based id in this round."""
        return self.participants.index(site) + 1

    def weight(self, site: str) -> float:
        return 1.0 if self.weights is None else self.weights[site]

    def neighbours_of(self, site: str) -> tuple[str, ...]:
        """The sites `site` masks with and shares with (not itself), in participant order."""
        n, k = len(self.participants), self.neighbours
        if k == n - 1:
            return tuple(p for p in self.participants if p != site)
        i = self.participants.index(site)
        near = {(i + d) % n for d in range(-(k // 2), k // 2 + 1) if d}
        return tuple(self.participants[j] for j in sorted(near))

    @property
    def elements(self) -> int:
        return sum(s.size for s in self.layout)

    @property
    def itemsize(self) -> int:
        """Bytes per entry of a masked vector: 4 for a modulus up to 2^32, else 8."""
        return 4 if self.modulus_bits <= 32 else 8

    def step(self, spec: TensorSpec) -> float:
        """Δ = 2c / L, the quantization step of one tensor (a site's rounding error is ≤ Δ/2)."""
        return 2 * spec.clip / self.levels


class PublicKeys(Record):
    """A site's two fresh public keys (PEM, SECP384R1): `mask` for the pairwise mask seeds s_uv,
    `enc` for encrypting the shares it sends its neighbours."""

    mask: Key
    enc: Key


class SetupReply(Record):
    keys: PublicKeys


class ShareKeysRequest(Record):
    """The public keys of the site's neighbours that answered setup, and its own (as it sent them)."""

    public_keys: dict[SiteName, PublicKeys] = Field(min_length=2, max_length=MAX_PARTICIPANTS)


class ShareKeysReply(Record):
    """For each neighbour v: Fernet token under the ECDH(enc) key of (u, v) holding u's index, v's index,
    v's share of b_u and v's share of sk_u (Flower's `share_keys_plaintext_concat`)."""

    tokens: dict[SiteName, Token] = Field(min_length=1, max_length=MAX_PARTICIPANTS)


class MaskedVectorRequest(Record):
    """The tokens addressed to this site, by source: the sources are the neighbours it must mask with."""

    tokens: dict[SiteName, Token] = Field(min_length=1, max_length=MAX_PARTICIPANTS)


class MaskedVectorReply(Record):
    """y_u, little-endian uint32 (modulus ≤ 2^32) or uint64, in layout order; and the sources whose tokens
    did not decrypt (this site holds none of their shares)."""

    vector: bytes = Field(min_length=4, max_length=MAX_ELEMENTS * 8)
    undecryptable: tuple[SiteName, ...] = Field(default=(), max_length=MAX_PARTICIPANTS)


class UnmaskRequest(Record):
    """Survivors: the sites whose masked vectors are in the sum; dropped: sites that shared keys but whose
    vectors are not. Sent to every survivor."""

    survivors: tuple[SiteName, ...] = Field(min_length=MIN_PARTICIPANTS, max_length=MAX_PARTICIPANTS)
    dropped: tuple[SiteName, ...] = Field(default=(), max_length=MAX_PARTICIPANTS)


class UnmaskReply(Record):
    """Shares this site holds: of b_u for survivors u, of sk_u for dropped u (never both for one site)."""

    b_shares: dict[SiteName, Share] = Field(default_factory=dict, max_length=MAX_PARTICIPANTS)
    sk_shares: dict[SiteName, Share] = Field(default_factory=dict, max_length=MAX_PARTICIPANTS)


# Message kinds for the protocol registry: (request, reply) of each stage, in order.
STAGES: dict[str, tuple[type[Record], type[Record]]] = {
    "secagg_setup": (SetupRequest, SetupReply),
    "secagg_share_keys": (ShareKeysRequest, ShareKeysReply),
    "secagg_masked_vector": (MaskedVectorRequest, MaskedVectorReply),
    "secagg_unmask": (UnmaskRequest, UnmaskReply),
}
Request = SetupRequest | ShareKeysRequest | MaskedVectorRequest | UnmaskRequest
Reply = SetupReply | ShareKeysReply | MaskedVectorReply | UnmaskReply


class SecAggRefused(MedmergeError):
    """A site refuses a stage (one line, logged at the site; the transport drops the site from the round)."""


class RoundFailed(MedmergeError):
    """The coordinator cannot complete the round (too few sites or shares left)."""
