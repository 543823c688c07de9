"""The coordinator's side of a secure sum: it relays keys and tokens, adds masked vectors, collects shares
and rebuilds only what the survivors agreed to reveal, then returns Σ_u w_u x_u over the survivors.

It never holds a site's secret: a survivor's b_u is rebuilt only after that site's y_u is in the total,
and a dropped site's sk_u only when its vector is not in it. Replies are keyed by the transport's
authenticated identity; anything unexpected or malformed drops that site (one line in `absent`), and the
round continues while enough sites and shares remain (else RoundFailed).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations, islice

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes

from medmerge.errors import MedmergeError
from medmerge.federated.secagg_records import (
    MIN_PARTICIPANTS,
    MaskedVectorReply,
    MaskedVectorRequest,
    PublicKeys,
    RoundFailed,
    SetupReply,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from medmerge.federated.secagg_site import load_public, mask_seed
from medmerge.federated.secagg_vector import Accumulator, sum_tolerance

log = logging.getLogger(__name__)
MAX_COMBINATIONS = 64  # t-subsets of shares tried per secret when more than t arrived


@dataclass(frozen=True)
class SecureSum:
    """The round's result: Σ_u w_u x_u over `survivors` per tensor (float64), within `tolerance`
    (survivors × Δ/2 per entry) of the exact weighted sum of their clipped inputs."""

    round_id: str
    tensors: dict[str, np.ndarray]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    absent: dict[str, str] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)


def _combine(shares: Mapping[str, bytes], holders: tuple[str, ...]) -> bytes | None:
    try:
        return combine_shares([shares[h] for h in holders])
    except ValueError:
        return None


def reconstruct(shares: Mapping[str, bytes], t: int, valid: Callable[[bytes], bool]) -> bytes | None:
    """The secret rebuilt from t of `shares`. With more than t, the first and the last t-subsets must agree
    (a wrong share spoils every subset holding it, each differently); if they do not, the secret most
    t-subsets agree on among those `valid` accepts. None: fewer than t shares, or no unique winner."""
    holders = sorted(shares)
    if len(holders) < t:
        return None
    first = _combine(shares, tuple(holders[:t]))
    if (
        first is not None
        and valid(first)
        and (len(holders) == t or _combine(shares, tuple(holders[-t:])) == first)
    ):
        return first
    votes: Counter[bytes] = Counter()
    for subset in islice(combinations(holders, t), MAX_COMBINATIONS):
        secret = _combine(shares, subset)
        if secret is not None and valid(secret):
            votes[secret] += 1
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


class SecAggCoordinator:
    """Drives one round: setup_requests → share_keys_requests(replies) → masked_vector_requests(replies)
    → receive_masked(site, reply) for each → unmask_requests() → aggregate(replies) → SecureSum."""

    def __init__(self, setup: SetupRequest) -> None:
        self.setup = SetupRequest.model_validate(setup.model_dump())
        self.need = max(MIN_PARTICIPANTS, setup.threshold)
        self.absent: dict[str, str] = {}
        self._keys: dict[str, PublicKeys] = {}
        self._holders: dict[str, tuple[str, ...]] = {}  # u → who holds u's shares (u included), by index
        self._u1: tuple[str, ...] = ()
        self._u2: list[str] = []
        self._acc: Accumulator | None = None

    def _drop(self, site: str, stage: str, reason: str) -> None:
        log.warning("secure sum %s: site %s left at %s: %s", self.setup.round_id, site, stage, reason)
        self.absent.setdefault(site, f"{stage}: {reason}")

    def _answered(self, stage: str, expected, replies: Mapping[str, object], kind: type) -> list[str]:
        ok = []
        for site in expected:
            reply = replies.get(site)
            if reply is None:
                self._drop(site, stage, "no reply")
            elif not isinstance(reply, kind):
                self._drop(site, stage, f"{type(reply).__name__} instead of {kind.__name__}")
            else:
                ok.append(site)
        for site in set(replies) - set(expected):
            log.warning(
                "secure sum %s: unexpected %s reply from %s ignored", self.setup.round_id, stage, site
            )
        return self._enough(stage, ok)

    def _enough(self, stage: str, sites: list[str]) -> list[str]:
        if len(sites) < self.need:
            raise RoundFailed(
                f"secure sum {self.setup.round_id}: {len(sites)} sites left after {stage}, {self.need} needed"
            )
        return sites

    def setup_requests(self) -> dict[str, SetupRequest]:
        return {site: self.setup for site in self.setup.participants}

    def share_keys_requests(self, replies: Mapping[str, object]) -> dict[str, ShareKeysRequest]:
        s = self.setup
        u0 = self._answered("setup", s.participants, replies, SetupReply)
        seen = Counter(k for u in u0 for k in (replies[u].keys.mask, replies[u].keys.enc))
        for u in list(u0):
            if any(seen[k] > 1 for k in (replies[u].keys.mask, replies[u].keys.enc)):
                self._drop(u, "setup", "public key identical to another's")
                u0.remove(u)
        while True:  # each site needs t holders among those still in
            holders = {u: tuple(v for v in u0 if v == u or v in s.neighbours_of(u)) for u in u0}
            short = [u for u in u0 if len(holders[u]) < s.threshold]
            if not short:
                break
            for u in short:
                self._drop(u, "setup", f"fewer than t={s.threshold} neighbours answered")
                u0.remove(u)
        self._enough("setup", u0)
        self._keys = {u: replies[u].keys for u in u0}
        self._holders = holders
        return {u: ShareKeysRequest(public_keys={v: self._keys[v] for v in holders[u]}) for u in u0}

    def masked_vector_requests(self, replies: Mapping[str, object]) -> dict[str, MaskedVectorRequest]:
        ok = self._answered("share_keys", list(self._holders), replies, ShareKeysReply)
        for u in list(ok):
            if set(replies[u].tokens) != set(self._holders[u]) - {u}:
                self._drop(u, "share_keys", "tokens not addressed to exactly its key holders")
                ok.remove(u)
        self._u1 = tuple(self._enough("share_keys", ok))
        self._acc = Accumulator(self.setup)
        return {
            v: MaskedVectorRequest(
                tokens={u: replies[u].tokens[v] for u in self._u1 if u != v and v in self._holders[u]}
            )
            for v in self._u1
        }

    def receive_masked(self, site: str, reply: object) -> None:
        """Add one site's masked vector to the total (call as each arrives; the reply may then be freed)."""
        if site not in self._u1 or site in self._u2:
            log.warning("secure sum %s: unexpected masked vector from %s ignored", self.setup.round_id, site)
            return
        if not isinstance(reply, MaskedVectorReply):
            return self._drop(site, "masked_vector", f"{type(reply).__name__} instead of MaskedVectorReply")
        try:
            self._acc.add(reply.vector)
        except MedmergeError as exc:
            return self._drop(site, "masked_vector", str(exc))
        self._u2.append(site)

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        for site in set(self._u1) - set(self._u2):
            self._drop(site, "masked_vector", "no masked vector")
        survivors = self._enough("masked_vector", sorted(self._u2, key=self.setup.index))
        dropped = tuple(u for u in self._u1 if u not in self._u2)
        request = UnmaskRequest(survivors=tuple(survivors), dropped=dropped)
        return {u: request for u in survivors}

    def _shares(self, replies: Mapping[str, object]) -> tuple[dict, dict]:
        """{u: {holder: share}} for b (survivors) and sk (dropped), each share's index checked."""
        survivors = set(self._u2)
        b: dict[str, dict[str, bytes]] = {u: {} for u in survivors}
        sk: dict[str, dict[str, bytes]] = {u: {} for u in self._u1 if u not in survivors}
        for v in sorted(survivors):
            reply = replies.get(v)
            if not isinstance(reply, UnmaskReply):
                self._drop(v, "unmask", "no shares")
                continue
            for table, given in ((b, reply.b_shares), (sk, reply.sk_shares)):
                for u, share in given.items():
                    if u not in table or v not in self._holders[u]:
                        self._drop(v, "unmask", f"a share of {u} it cannot hold")
                        continue
                    if int.from_bytes(share[:4], "little") != self._holders[u].index(v) + 1:
                        self._drop(v, "unmask", f"share of {u} with a wrong index")
                        continue
                    table[u][v] = share
        return b, sk

    def aggregate(self, replies: Mapping[str, object]) -> SecureSum:
        """Rebuild each survivor's b_u and each dropped site's sk_u, remove every mask, dequantize."""
        s, survivors = self.setup, tuple(sorted(self._u2, key=self.setup.index))
        b, sk = self._shares(replies)
        streams = []
        for u in survivors:
            seed = reconstruct(b[u], s.threshold, lambda x: len(x) == 32)
            if seed is None:
                raise RoundFailed(f"secure sum {s.round_id}: b of {u} not rebuilt ({len(b[u])} shares)")
            streams.append((seed, 1))
        for u, shares in sk.items():
            neighbours = [v for v in survivors if v in s.neighbours_of(u)]  # they masked with u
            if not neighbours:
                continue

            def matches(secret: bytes, u: str = u) -> bool:
                try:
                    return (
                        public_key_to_bytes(bytes_to_private_key(secret).public_key()) == self._keys[u].mask
                    )
                except (ValueError, TypeError):
                    return False

            secret = reconstruct(shares, s.threshold, matches)
            if secret is None:
                raise RoundFailed(
                    f"secure sum {s.round_id}: sk of dropped {u} not rebuilt ({len(shares)} shares)"
                )
            private = bytes_to_private_key(secret)
            for v in neighbours:  # remove v's ±PRG(s_uv), the sign v gave it
                sign = 1 if s.index(v) > s.index(u) else -1
                streams.append((mask_seed(private, load_public(self._keys[v].mask)), sign))
        tensors = self._acc.unmask(streams)
        self._acc = None
        dropped = tuple(u for u in self._u1 if u not in self._u2)
        return SecureSum(
            s.round_id, tensors, survivors, dropped, dict(self.absent), sum_tolerance(s, len(survivors))
        )
