"""Payload: what crosses the wire. JSON metadata (checksums, recipes, numbers) and named bytes (LoRA
adapters as safetensors; with federation.share_statistics, site statistics: sums over a site's tokens,
as safetensors); never question or answer text, token ids or per-token hidden states.

A Payload is only the envelope: what each kind of message may hold is typed in
medmerge.federated.protocol, which checks every message before it is used. Parsing here never raises on
what a party sent: a frame that does not parse (bad JSON, NaN or Infinity, a blob table that does not
add up, over the size caps) becomes `Payload("invalid", {"reason": …})`, which the protocol refuses like
any other bad message (the coordinator drops the site that sent it; a site answers bad_request).

Also here, because site.py, protocol.py and coordinator.py all need them: the pattern every name that
arrives from another party must match (`check_name`), and the refusals a site answers with a fixed code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from medmerge.errors import MedmergeError

META, BLOBS = "medmerge-meta", "medmerge-blobs"
BLOB_STYPE = "medmerge.bytes"  # the serialization type of a blob's Array: its data are the bytes
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"  # site, peer, method, model and set names: no dot, so no `..`
MAX_NAME = 64
MESSAGE_BYTES = (2 << 30) - (16 << 20)  # a whole message: gRPC's 2 GiB, less a margin
META_BYTES = 16 << 20  # its JSON part
FAILED = "medmerge site failed:"  # starts the line a failed request leaves in the site's log


class ProtocolError(MedmergeError):
    """A message that breaks the protocol; `field` names where (one line, nothing of the message's text
    beyond a short, escaped name)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


class Refused(MedmergeError):
    """A request the site will not answer (a bad name, an adapter it never received, a replaced
    adapter, statistics it does not share): code `refused`."""


class OverBudget(Refused):
    """A request beyond the site's query budget: code `over_budget`."""


def shown(value: Any, limit: int = 40) -> str:
    """A value from another party as it may appear in a log line: escaped, one line, at most `limit`."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def log_failure(site: str, kind: str, code: str, exc: BaseException) -> None:
    """The one line a failed request leaves in the site's own log (stderr of its worker): the full
    reason, which never crosses the wire (`medmerge federate` shows it from the local logs)."""
    import sys

    what = kind if re.fullmatch(NAME_PATTERN, kind) and len(kind) <= MAX_NAME else shown(kind, 20)
    line = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    print(f"{FAILED} {site} {what}: {line} [{code}]", file=sys.stderr, flush=True)


def check_name(value: Any, what: str) -> str:
    """`value` if it is a name (NAME_PATTERN, at most MAX_NAME characters), else Refused naming `what`."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not re.fullmatch(NAME_PATTERN, value):
        raise Refused(f"{what}: {shown(value)} is not a name (letters, digits, _ and - only)")
    return value


def loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (ValueError)."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a finite JSON number")

    return json.loads(text, parse_constant=constant)


@dataclass(frozen=True)
class Payload:
    kind: str  # a message kind of medmerge.federated.protocol, or "invalid" (did not parse)
    meta: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes of this payload's content (JSON text + blobs)."""
        return len(self.meta_text().encode()) + sum(len(b) for b in self.blobs.values())

    def meta_text(self) -> str:
        return json.dumps({"kind": self.kind, **self.meta}, sort_keys=True, allow_nan=False)

    def to_record(self) -> Any:
        """The Flower RecordDict: the JSON in a ConfigRecord, each blob a 1-D uint8 Array of an ArrayRecord.
        An Array is cut into chunks whose ids Flower computes once; a bytes value of a ConfigRecord is
        serialized and hashed whole on every `object_id` (measured on a 126 MB blob: 0.3 s vs ≈ 40 s of
        one CPU across a message's path)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        blobs = {
            k: Array(dtype="uint8", shape=(len(v),), stype=BLOB_STYPE, data=v) for k, v in self.blobs.items()
        }
        return RecordDict({META: ConfigRecord({"json": self.meta_text()}), BLOBS: ArrayRecord(blobs)})

    @classmethod
    def from_record(cls, content: Any) -> Payload:
        from flwr.app import Array, ArrayRecord

        try:
            text = content[META]["json"]
            record = content.get(BLOBS, ArrayRecord())
            if not isinstance(text, str) or not isinstance(record, ArrayRecord):
                raise ValueError("not a medmerge message")
            blobs = {}
            for name, array in record.items():
                if not isinstance(name, str) or not isinstance(array, Array) or array.stype != BLOB_STYPE:
                    raise ValueError("a blob that is not a medmerge byte array")
                blobs[name] = bytes(array.data)
            return _checked(text, blobs)
        except Exception as exc:  # noqa: BLE001 (whatever arrived, it is refused the same way)
            return _invalid(exc)

    def to_bytes(self) -> bytes:
        """One frame for the site's local worker socket: header length, JSON header, then the blobs."""
        header = json.dumps(
            {"meta": loads(self.meta_text()), "blobs": [[k, len(v)] for k, v in self.blobs.items()]},
            allow_nan=False,
        ).encode()
        return b"".join([len(header).to_bytes(8, "big"), header, *self.blobs.values()])

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        try:
            if len(data) > MESSAGE_BYTES:
                raise ValueError(f"{len(data)} bytes, over the {MESSAGE_BYTES}-byte cap")
            size = int.from_bytes(data[:8], "big")
            if size > META_BYTES:
                raise ValueError(f"a {size}-byte header")
            header = loads(data[8 : 8 + size])
            blobs, at = {}, 8 + size
            for name, length in header["blobs"]:
                if not isinstance(name, str) or not isinstance(length, int) or length < 0 or name in blobs:
                    raise ValueError("a bad blob table")
                blobs[name], at = data[at : at + length], at + length
            if at != len(data):
                raise ValueError("the blob table does not add up")
            return _checked(json.dumps(header["meta"]), blobs)
        except Exception as exc:  # noqa: BLE001
            return _invalid(exc)


def _checked(text: str, blobs: dict[str, bytes]) -> Payload:
    if len(text) > META_BYTES:
        raise ValueError(f"{len(text)} characters of JSON, over the {META_BYTES} cap")
    meta = loads(text)
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise ValueError("no message kind")
    kind = meta.pop("kind")
    if kind == "invalid":
        raise ValueError("kind 'invalid' is not sent")
    if len(text) + sum(len(b) for b in blobs.values()) > MESSAGE_BYTES:
        raise ValueError(f"over the {MESSAGE_BYTES}-byte message cap")
    return Payload(kind=kind, meta=meta, blobs=blobs)


def _invalid(exc: Exception) -> Payload:
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return Payload("invalid", {"reason": shown(reason, 120)})


def record_mod(log_dir: str | None):
    """A ClientApp mod that appends every message in and out (JSON + blobs, raw) to `log_dir`: the
    site's own record of what crossed the wire (used by the privacy canary tests)."""
    from pathlib import Path

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        folder = log_dir or context.node_config.get("wire-log")
        reply = call_next(msg, context)
        if folder:
            path = Path(str(folder))
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "messages.bin", "ab") as f:
                for m in (msg, reply):
                    if m.has_content():
                        p = Payload.from_record(m.content)
                        f.write(p.meta_text().encode() + b"\n")
                        for name, blob in p.blobs.items():
                            f.write(name.encode() + b"\n" + blob + b"\n")
        return reply

    return mod
