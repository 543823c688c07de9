"""A site's side of a secure sum: its state machine (secrets in memory only) and the refusals that protect it.

Each site enforces, for itself and whatever the coordinator says:
- at least 3 participants at setup and 3 survivors at unmask (with 2, each learns the other's value);
- a budget of sums joined (`SitePolicy.max_sums`), counted in `secagg_history.json` in its folder;
- no unnoised sum whose coefficient vector (w_u per participant, 0 for absent sites), with those of the
  unnoised sums it joined before, spans a single site's indicator e_X. That covers two sums over sets that
  differ by one site (leave-one-site-out, a retry without a dropped site: e_X = 1_S − 1_S′), the same
  set under changed weights, and any longer combination among the sums this site joined. A noised sum
  (`secure+dp`) is allowed and charged to the site's privacy ledger through the injected `charge`.
- one answer per stage, in order; a site gives shares of b_u (u survived) or of sk_u (u dropped), never
  both, since the two lists it is sent must be disjoint and it answers one unmask per round.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from pydantic import ValidationError

from medmerge.errors import MedmergeError
from medmerge.federated.secagg_history import SitePolicy, SumHistory
from medmerge.federated.secagg_records import (
    MaskedVectorReply,
    MaskedVectorRequest,
    PublicKeys,
    Reply,
    Request,
    SecAggRefused,
    SetupReply,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    SiteName,
    UnmaskReply,
    UnmaskRequest,
)
from medmerge.federated.secagg_vector import mask, ordered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contribution:
    """What a site puts into a sum: its named float tensors (layout names and shapes), and, in
    `secure+dp`, the noise multiplier its share of Gaussian noise was calibrated for (the sum of any
    ≥ t sites' shares carries std ≥ noise_multiplier × sensitivity)."""

    tensors: Mapping[str, np.ndarray]
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class SumRelease:
    """A noised sum a site joined, as handed to its privacy ledger (`charge`) before its vector leaves."""

    round_id: str
    participants: tuple[str, ...]
    threshold: int
    noise_multiplier: float


def mask_seed(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    """s_uv: the 32-byte HKDF-SHA256 output of ECDH(u, v) (Flower's generate_shared_key), as PRG seed."""
    return base64.urlsafe_b64decode(generate_shared_key(private, public))


def load_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = bytes_to_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError("not a SECP384R1 public key")
    return key


class SecAggSite:
    """One site in one secure round. `handle(request)` answers each stage's request or raises
    SecAggRefused (one line; logged here). `contribute(setup)` is called once, at the masked-vector
    stage, for the site's tensors; `charge(release)` (secure+dp only) spends the site's privacy budget
    and raises MedmergeError to refuse. Secrets (two private keys, b_u, shares received) live only in
    this object: not logged, not picklable, dropped at the stage that last needs them."""

    def __init__(
        self,
        name: str,
        folder: str | Path,
        contribute: Callable[[SetupRequest], Contribution],
        *,
        policy: SitePolicy | None = None,
        charge: Callable[[SumRelease], None] | None = None,
    ) -> None:
        from pydantic import TypeAdapter

        self.name = TypeAdapter(SiteName).validate_python(name)
        self.policy = policy or SitePolicy()
        self.history = SumHistory(folder)
        self._contribute, self._charge = contribute, charge
        self.stage = "setup"
        self.setup_request: SetupRequest | None = None
        self.clipped = 0  # entries of this site's vector that fell outside ±c (its own log only)
        self._wipe()

    def __repr__(self) -> str:
        return f"SecAggSite({self.name!r}, stage={self.stage!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a SecAggSite holds secrets and is not picklable")

    def _wipe(self) -> None:
        self._sk_mask = self._sk_enc = self._b = None
        self._peers: dict[str, tuple[Any, Any]] = {}
        self._b_shares: dict[str, bytes] = {}
        self._sk_shares: dict[str, bytes] = {}
        self._masked_with: tuple[str, ...] = ()

    def _refuse(self, reason: str) -> SecAggRefused:
        round_id = self.setup_request.round_id if self.setup_request else "?"
        log.warning("secure sum %s at site %s refused: %s", round_id, self.name, reason)
        self._wipe()
        self.stage = "refused"
        return SecAggRefused(f"site {self.name}: {reason}")

    def handle(self, request: Request) -> Reply:
        """Answer one stage's request (the stage is the request's type; out of order is refused)."""
        stages: dict[type, tuple[str, Callable[[Any], Reply]]] = {
            SetupRequest: ("setup", self._setup),
            ShareKeysRequest: ("share_keys", self._share_keys),
            MaskedVectorRequest: ("masked_vector", self._masked_vector),
            UnmaskRequest: ("unmask", self._unmask),
        }
        stage, step = stages.get(type(request), ("unknown", None))
        if stage != self.stage or step is None:
            raise self._refuse(f"{stage} request while expecting {self.stage}")
        try:
            type(request).model_validate(request.model_dump())  # re-check every rule, however it was built
            return step(request)
        except SecAggRefused:
            raise
        except ValidationError as exc:
            first = exc.errors()[0]
            raise self._refuse(f"{'.'.join(map(str, first['loc'])) or 'request'}: {first['msg']}") from None
        except (MedmergeError, ValueError) as exc:
            raise self._refuse(str(exc).splitlines()[0]) from None
        except Exception as exc:  # e.g. the contribution's own failure: its text stays in the site's log
            log.exception("secure sum at site %s: %s failed", self.name, stage)
            raise self._refuse(f"{stage} failed ({type(exc).__name__})") from None

    def _coefficients(self, sites: tuple[str, ...]) -> dict[str, float]:
        return {s: self.setup_request.weight(s) for s in sites}

    def _check_sum(self, sites: tuple[str, ...], budget: bool = True) -> None:
        s, floor = self.setup_request, max(self.policy.min_participants, self.setup_request.threshold)
        if len(sites) < floor:
            raise self._refuse(f"a secure sum over {len(sites)} sites (fewer than {floor}) is refused")
        if s.mode == "secure" and not self.policy.allow_unnoised:
            raise self._refuse("this site joins noised sums only (secure+dp)")
        if budget and self.history.sums_joined >= self.policy.max_sums:
            raise self._refuse(f"budget of {self.policy.max_sums} secure sums spent")
        if s.mode == "secure":
            reason = self.history.reveals(self._coefficients(sites))
            if reason:
                raise self._refuse(f"an unnoised sum over {', '.join(sites)} {reason}; use secure+dp")

    def _setup(self, req: SetupRequest) -> SetupReply:
        self.setup_request = req
        if self.name not in req.participants:
            raise self._refuse("not a participant of this round")
        if req.mode == "secure+dp" and self._charge is None:
            raise self._refuse("secure+dp needs the site's privacy ledger")
        self._check_sum(req.participants)
        (self._sk_mask, pk_mask), (self._sk_enc, pk_enc) = generate_key_pairs(), generate_key_pairs()
        self.stage = "share_keys"
        return SetupReply(keys=PublicKeys(mask=public_key_to_bytes(pk_mask), enc=public_key_to_bytes(pk_enc)))

    def _share_keys(self, req: ShareKeysRequest) -> ShareKeysReply:
        s, keys = self.setup_request, req.public_keys
        mine = PublicKeys(
            mask=public_key_to_bytes(self._sk_mask.public_key()),
            enc=public_key_to_bytes(self._sk_enc.public_key()),
        )
        if keys.get(self.name) != mine:
            raise self._refuse("own public keys missing or altered")
        if not set(keys) <= {self.name, *s.neighbours_of(self.name)} or len(keys) < s.threshold:
            raise self._refuse(f"{len(keys)} key holders, not neighbours or fewer than t={s.threshold}")
        flat = [k for pk in keys.values() for k in (pk.mask, pk.enc)]
        if len(set(flat)) != len(flat):
            raise self._refuse("two public keys are identical")
        self._peers = {
            v: (load_public(pk.mask), load_public(pk.enc)) for v, pk in keys.items() if v != self.name
        }
        holders = sorted(keys, key=s.index)
        self._b = os.urandom(32)
        b_shares = create_shares(self._b, s.threshold, len(holders))
        sk_shares = create_shares(private_key_to_bytes(self._sk_mask), s.threshold, len(holders))
        tokens = {}
        for holder, b_share, sk_share in zip(holders, b_shares, sk_shares, strict=True):
            if holder == self.name:
                self._b_shares[holder], self._sk_shares[holder] = b_share, sk_share
                continue
            key = generate_shared_key(self._sk_enc, self._peers[holder][1])
            plain = share_keys_plaintext_concat(s.index(self.name), s.index(holder), b_share, sk_share)
            tokens[holder] = encrypt(key, plain)
        self.stage = "masked_vector"
        return ShareKeysReply(tokens=tokens)

    def _masked_vector(self, req: MaskedVectorRequest) -> MaskedVectorReply:
        s = self.setup_request
        sources = tuple(sorted(req.tokens, key=s.index))
        if not set(sources) <= set(self._peers) or len(sources) + 1 < s.threshold:
            raise self._refuse(f"tokens from {len(sources)} sites, not my key holders or fewer than t − 1")
        undecryptable = []
        for src in sources:
            try:
                plain = decrypt(generate_shared_key(self._sk_enc, self._peers[src][1]), req.tokens[src])
                src_id, dst_id, b_share, sk_share = share_keys_plaintext_separate(plain)
                if (src_id, dst_id) != (s.index(src), s.index(self.name)):
                    raise ValueError("misaddressed")
            except (InvalidToken, ValueError):
                log.warning("secure sum %s at %s: token from %s did not decrypt", s.round_id, self.name, src)
                undecryptable.append(src)
                continue
            self._b_shares[src], self._sk_shares[src] = b_share, sk_share
        contribution = self._contribute(s)
        tensors = ordered(s, contribution.tensors)
        if s.mode == "secure+dp":
            if (contribution.noise_multiplier or 0) < s.noise_multiplier:
                raise self._refuse(f"the contribution's noise is below noise_multiplier {s.noise_multiplier}")
        self._check_sum(s.participants)
        pairs = [
            (mask_seed(self._sk_mask, self._peers[v][0]), 1 if s.index(self.name) > s.index(v) else -1)
            for v in sources
        ]
        vector, self.clipped = mask(s, tensors, s.weight(self.name), self._b, pairs)  # refuses NaN
        if s.mode == "secure+dp":  # spent and counted before the vector leaves
            try:
                self._charge(SumRelease(s.round_id, s.participants, s.threshold, s.noise_multiplier))
            except MedmergeError as exc:
                raise self._refuse(f"privacy ledger: {str(exc).splitlines()[0]}") from None
        self.history.add_joined()
        if self.clipped:
            log.warning(
                "secure sum %s at site %s: %d entries clipped to ±c", s.round_id, self.name, self.clipped
            )
        self._masked_with = sources
        self._sk_mask = self._sk_enc = self._b = None
        self._peers = {}
        self.stage = "unmask"
        return MaskedVectorReply(vector=vector, undecryptable=tuple(undecryptable))

    def _unmask(self, req: UnmaskRequest) -> UnmaskReply:
        s = self.setup_request
        survivors, dropped = set(req.survivors), set(req.dropped)
        if survivors & dropped or not (survivors | dropped) <= set(s.participants):
            raise self._refuse("survivors and dropped overlap or name non-participants")
        if self.name not in survivors or not set(self._masked_with) <= survivors | dropped:
            raise self._refuse("the survivor list leaves out this site or one of its neighbours")
        sites = tuple(sorted(survivors))
        self._check_sum(sites, budget=False)  # counted when its vector left
        if s.mode == "secure":
            self.history.add_unnoised(s.round_id, self._coefficients(sites))
        reply = UnmaskReply(
            b_shares={u: sh for u, sh in self._b_shares.items() if u in survivors},
            sk_shares={u: sh for u, sh in self._sk_shares.items() if u in dropped},
        )
        self._wipe()
        self.stage = "done"
        return reply
