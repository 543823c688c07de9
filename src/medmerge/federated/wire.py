"""Payload: what crosses the wire. JSON metadata (identities, checksums, recipes, numbers) and named
bytes (LoRA adapters as safetensors; with federation.share_statistics, site statistics: sums over a
site's tokens, as safetensors); never question or answer text, token ids or per-token hidden states."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

META, BLOBS = "medmerge-meta", "medmerge-blobs"


@dataclass(frozen=True)
class Payload:
    kind: str  # hello | train | adapters | statistics | score | fedavg | evaluate | error
    meta: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes of this payload's content (JSON text + blobs)."""
        return len(self.meta_text().encode()) + sum(len(b) for b in self.blobs.values())

    def meta_text(self) -> str:
        return json.dumps({"kind": self.kind, **self.meta}, sort_keys=True)

    def to_record(self) -> Any:
        from flwr.app import ConfigRecord, RecordDict

        return RecordDict(
            {META: ConfigRecord({"json": self.meta_text()}), BLOBS: ConfigRecord(dict(self.blobs))}
        )

    @classmethod
    def from_record(cls, content: Any) -> Payload:
        meta = json.loads(content[META]["json"])
        blobs = {k: bytes(v) for k, v in content[BLOBS].items()} if BLOBS in content else {}
        return cls(kind=meta.pop("kind"), meta=meta, blobs=blobs)

    def to_bytes(self) -> bytes:
        """One frame for the site's local worker socket: header length, JSON header, then the blobs."""
        header = json.dumps(
            {"meta": json.loads(self.meta_text()), "blobs": [[k, len(v)] for k, v in self.blobs.items()]}
        ).encode()
        return b"".join([len(header).to_bytes(8, "big"), header, *self.blobs.values()])

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        size = int.from_bytes(data[:8], "big")
        header = json.loads(data[8 : 8 + size])
        blobs, at = {}, 8 + size
        for name, length in header["blobs"]:
            blobs[name], at = data[at : at + length], at + length
        meta = header["meta"]
        return cls(kind=meta.pop("kind"), meta=meta, blobs=blobs)


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
