"""The coordinator's checks of a site's adapter against the base model: same base checksum, and every
LoRA factor's shape fits the base weight it adapts; and of its shared site statistics (check_statistics).
A mismatch is one line naming the site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError


def base_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_adapter(
    site: str, meta: dict[str, Any], blobs: dict[str, bytes], base_checksum: str, shapes: dict
) -> None:
    """Refuse `site`'s adapter (MedmergeError, one line) unless it was trained on this base and fits it."""

    theirs = (meta.get("base") or {}).get("checksum")
    if theirs != base_checksum:
        raise MedmergeError(
            f"site {site}: adapter trained on another base model (checksum {str(theirs)[:12]}…, "
            f"expected {base_checksum[:12]}…)"
        )
    check_shapes(site, blobs, shapes)


def check_shapes(site: str, blobs: dict[str, bytes], shapes: dict) -> None:
    """Refuse `site`'s adapter (one line) unless it is readable and every LoRA factor fits the base."""
    from safetensors.torch import load

    try:
        tensors = load(blobs["adapter_model.safetensors"])
        json.loads(blobs["adapter_config.json"])
    except Exception as exc:  # noqa: BLE001 (any unreadable adapter is refused the same way)
        raise MedmergeError(f"site {site}: unreadable adapter ({type(exc).__name__})") from None
    for key, tensor in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        target = shapes.get(f"{module}.weight")
        if target is None or len(target) != 2:
            raise MedmergeError(f"site {site}: adapter tensor {key} adapts no 2-D weight of the base model")
        out_features, in_features = target
        ok = tensor.shape[1] == in_features if ".lora_A." in key else tensor.shape[0] == out_features
        if tensor.dim() != 2 or not ok:
            raise MedmergeError(
                f"site {site}: adapter tensor {key} has shape {tuple(tensor.shape)}, which does not fit "
                f"the base weight {module}.weight {target}"
            )


def check_statistics(site: str, blobs: dict[str, bytes], shapes: dict, kinds: list[str]) -> None:
    """Refuse `site`'s shared statistics (one line) unless both files are there, the record describes
    the tensor file (format, size, SHA-256, the `kinds` asked for) and every tensor fits the base: a Gram
    (in, in) and a Fisher the shape of the weight it belongs to, float32, keyed by a base weight name."""
    import hashlib

    from medmerge.site_stats import FORMAT, INFO_FILE, KINDS, SEPARATOR, TENSORS_FILE

    def refuse(why: str) -> MedmergeError:
        return MedmergeError(f"site {site}: shared statistics refused ({why})")

    if TENSORS_FILE not in blobs or INFO_FILE not in blobs:
        raise refuse(f"{TENSORS_FILE} and {INFO_FILE} expected")
    data = blobs[TENSORS_FILE]
    try:
        info = json.loads(blobs[INFO_FILE])
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as exc:  # noqa: BLE001 (any unreadable pair is refused the same way)
        raise refuse(f"unreadable, {type(exc).__name__}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise refuse(f"format {info.get('format') if isinstance(info, dict) else None!r}")
    if info.get("bytes") != len(data) or info.get("sha256") != hashlib.sha256(data).hexdigest():
        raise refuse("its record's size or SHA-256 does not match the tensor file")
    missing = sorted(set(kinds) - set(info.get("kinds", ())))
    if missing:
        raise refuse(f"no {' and '.join(missing)} statistics")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        kind, _, name = key.partition(SEPARATOR)
        target = shapes.get(name)
        if kind not in KINDS or target is None or len(target) != 2:
            raise refuse(f"tensor {key} is no statistic of a 2-D base weight")
        expected = [target[1], target[1]] if kind == "gram" else list(target)
        if entry.get("dtype") != "F32" or entry.get("shape") != expected:
            raise refuse(
                f"tensor {key} is {entry.get('dtype')} {entry.get('shape')}, expected F32 {expected}"
            )
    for name, target in (info.get("aliases") or {}).items():
        if f"gram{SEPARATOR}{target}" not in header or name not in shapes:
            raise refuse(f"Gram alias {name} -> {target} names no stored Gram of a base weight")
