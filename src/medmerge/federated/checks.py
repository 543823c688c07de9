"""The coordinator's checks of a site's adapter against the base model: same base checksum, and every
LoRA factor's shape fits the base weight it adapts. A mismatch is one line naming the site."""

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
