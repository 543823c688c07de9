"""Secure aggregation (SecAgg+, Bell et al. 2020) of sites' statistics, from Flower's own primitives.

The coordinator learns Σ_u w_u x_u over the surviving sites, and nothing about a single site's x_u beyond
that sum (honest-but-curious coordinator, fewer than t colluding sites: docs/secure-aggregation.md).

    setup = recommended_setup("gram-1", ["a", "b", "c"], layout)        # public parameters
    coordinator = SecAggCoordinator(setup)
    result = run_secure_sum(coordinator, exchange)                      # result.tensors: the sum

`exchange(requests)` is the transport: it sends each named site its request (a stage record) and returns
the replies keyed by the AUTHENTICATED identity of each replier; a site that refused, failed or timed out
is simply absent. At a site, `SecAggSite(...).handle(request)` answers each stage. `LocalExchange` is the
in-process transport (records cross as JSON, every byte the coordinator relays is kept in `wire`).

Primitives: key pairs (SECP384R1) from `flwr.supercore.primitives.asymmetric`; ECDH + HKDF, Fernet
encryption and decryption from `flwr.common.secure_aggregation.crypto.symmetric_encryption`; Shamir
shares from `...crypto.shamir`; share plaintexts from `...secaggplus_utils`; the mask PRG is AES-256-CTR
from `cryptography` (see secagg_vector for why not Flower's PRG). Quantization and the modular sum are
numpy arithmetic (secagg_vector).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from pydantic import ValidationError

from medmerge.errors import MedmergeError
from medmerge.federated.secagg_history import HISTORY_FILE, SitePolicy, SumHistory
from medmerge.federated.secagg_records import (
    STAGES,
    MaskedVectorReply,
    Record,
    Reply,
    Request,
    RoundFailed,
    SecAggRefused,
    SetupRequest,
    TensorSpec,
)
from medmerge.federated.secagg_server import SecAggCoordinator, SecureSum
from medmerge.federated.secagg_site import Contribution, SecAggSite, SumRelease
from medmerge.federated.secagg_vector import simulate_sum, spec_for, sum_tolerance

__all__ = [
    "HISTORY_FILE",
    "STAGES",
    "Contribution",
    "LocalExchange",
    "RoundFailed",
    "SecAggCoordinator",
    "SecAggRefused",
    "SecAggSite",
    "SecureSum",
    "SetupRequest",
    "SitePolicy",
    "SumHistory",
    "SumRelease",
    "TensorSpec",
    "recommended_setup",
    "run_secure_sum",
    "simulate_sum",
    "spec_for",
    "sum_tolerance",
    "wire_size",
]
log = logging.getLogger(__name__)
Exchange = Callable[[dict[str, Request]], Mapping[str, Reply] | Iterable[tuple[str, Reply]]]
STAGE_OF = {request: name for name, (request, _) in STAGES.items()}


def recommended_setup(
    round_id: str,
    participants: Sequence[str],
    layout: Sequence[TensorSpec],
    *,
    modulus_bits: int = 64,
    levels: int | None = None,
    weights: Mapping[str, float] | None = None,
    mode: str = "secure",
    noise_multiplier: float | None = None,
) -> SetupRequest:
    """A SetupRequest with the parameters docs/secure-aggregation.md recommends: the complete graph
    (k = N − 1) up to 20 sites, else a ring of k = 2·⌈log₂ N⌉; t = ⌊(k+1)/2⌋ + 1 share holders (a
    majority); and, unless given, the most levels the modulus allows, L = 2^(bits − ⌊log₂ N⌋ − 1), capped
    at 2^44 (so N·L < 2^bits)."""
    names = sorted(participants)
    n = len(names)
    k = n - 1 if n <= 20 else 2 * math.ceil(math.log2(n))
    if levels is None:
        levels = 2 ** min(44, modulus_bits - int(math.log2(max(n, 1))) - 1)
    try:
        return SetupRequest(
            round_id=round_id,
            participants=tuple(names),
            threshold=(k + 1) // 2 + 1,
            neighbours=k,
            levels=levels,
            modulus_bits=modulus_bits,
            layout=tuple(layout),
            weights=dict(weights) if weights is not None else None,
            mode=mode,
            noise_multiplier=noise_multiplier,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "setup"
        raise MedmergeError(f"secure sum {round_id}: {where}: {first['msg']}") from None


def _items(replies: Mapping[str, Reply] | Iterable[tuple[str, Reply]]) -> Iterable[tuple[str, Reply]]:
    return replies.items() if isinstance(replies, Mapping) else replies


def run_secure_sum(coordinator: SecAggCoordinator, exchange: Exchange) -> SecureSum:
    """Drive the four stages over `exchange`; raises RoundFailed when too few sites or shares remain.
    An exchange may return an iterable of (site, reply) instead of a mapping: the masked vectors are
    then added to the total one by one as they come, and each can be freed before the next arrives."""
    replies = dict(_items(exchange(coordinator.setup_requests())))
    replies = dict(_items(exchange(coordinator.share_keys_requests(replies))))
    for site, reply in _items(exchange(coordinator.masked_vector_requests(replies))):
        coordinator.receive_masked(site, reply)
        del reply
    return coordinator.aggregate(dict(_items(exchange(coordinator.unmask_requests()))))


def wire_size(record: Record) -> int:
    """Bytes of a record as a blob-carrying transport sends it: the JSON of its small fields, plus the
    masked vector raw (not base64)."""
    if isinstance(record, MaskedVectorReply):
        return len(record.model_dump_json(exclude={"vector"})) + len(record.vector)
    return len(record.model_dump_json())


class LocalExchange:
    """In-process transport over `sites` ({name: SecAggSite}). Each request and reply crosses as JSON and
    is parsed by its receiver's record type (with `serialize=False`, records are passed as they are:
    for benchmarks of large vectors; with `stream=True`, replies come as a generator, each site handled
    when the coordinator reaches it). `drop={site: stage}` makes a site vanish from that stage on.
    Kept: `wire` [(direction, site, stage, JSON bytes)], every byte the coordinator sent or received
    (serialize=True only); `refusals` {site: reason}; `sent` and `received` bytes per site (wire_size)."""

    def __init__(
        self,
        sites: Mapping[str, SecAggSite],
        *,
        serialize: bool = True,
        drop: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> None:
        self.sites, self.serialize, self.drop, self.stream = dict(sites), serialize, dict(drop or {}), stream
        self.wire: list[tuple[str, str, str, bytes]] = []
        self.refusals: dict[str, str] = {}
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self._gone: set[str] = set()

    def _cross(self, direction: str, site: str, stage: str, record: Record) -> Record:
        count = self.sent if direction == "to" else self.received
        count[site] = count.get(site, 0) + wire_size(record)
        if not self.serialize:
            return record
        data = record.model_dump_json().encode()
        self.wire.append((direction, site, stage, data))
        return type(record).model_validate_json(data)

    def __call__(self, requests: dict[str, Request]) -> dict[str, Reply] | Iterator[tuple[str, Reply]]:
        replies = self._replies(requests)
        return replies if self.stream else dict(replies)

    def _replies(self, requests: dict[str, Request]) -> Iterator[tuple[str, Reply]]:
        for site, request in requests.items():
            stage = STAGE_OF[type(request)]
            if self.drop.get(site) == stage or site in self._gone:
                self._gone.add(site)
                continue
            try:
                reply = self.sites[site].handle(self._cross("to", site, stage, request))
            except (SecAggRefused, ValidationError) as exc:
                self.refusals[site] = str(exc).splitlines()[0]
                self._gone.add(site)
                continue
            yield site, self._cross("from", site, stage, reply)
