"""The coordinator's checks of what a site sends, before anything is merged or forwarded.

Adapters (validate_adapter). A site's `adapter_config.json` and `adapter_model.safetensors` are held to the
study's LoRA (LoraStudy, built once from the study's `train.lora` and the base by `lora_study`):
  - the config is a JSON object of PEFT LoraConfig keys only, and every field that changes what the
    adapter means (r, lora_alpha, use_rslora, use_dora, fan_in_fan_out, alpha_pattern, rank_pattern,
    modules_to_save, bias, …) equals the study's; only the base path, revision, peft_version,
    inference_mode, lora_dropout and the order of target_modules may differ. Patterns are compared as
    data, never compiled (a regex such as `(a+)+$` would hang the coordinator);
  - the safetensors header is valid and bounded (≤ MAX_HEADER_BYTES, offsets contiguous and in range);
  - its tensors are exactly the lora_A / lora_B pairs an honest adapter of the study holds (PEFT's own
    state-dict names and shapes: A (r, in), B (out, r) of each adapted Linear), nothing else: no
    modules_to_save, no full weights, no DoRA magnitudes;
  - dtypes float32 / float16 / bfloat16, every value finite.
It returns the factors with the STUDY's scale s (alpha/r, or alpha/√r with rsLoRA): ΔW = s·B·A.
`canonical_adapter` re-serialises a checked adapter (optionally with ΔW scaled per module) with the
study's canonical config, so peers receive only that — never the site's own bytes or base path.

Statistics (check_statistics): the record describes the tensor file (format, size, SHA-256, kinds); every
tensor fits the base (Gram (in, in), Fisher the weight's shape, float32); every value finite; a Gram
symmetric with a non-negative diagonal, a Fisher ≥ 0; and the Gram's trace, which is Σ_t ‖x_t‖² over
the tokens it sums, is bounded by the tokens the site declared: trace ≤ C·tokens when the sites clip each
token to ‖x‖² ≤ C (StatisticsBounds.token_norm_sq), and tokens ≤ StatisticsBounds.max_tokens. Without
clipping, robust.screen_gram_scales compares each site's trace/tokens (mean ‖x‖², per weight) with the
other sites'. Each refusal is one MedmergeError line naming the site and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmerge.errors import MedmergeError

MAX_HEADER_BYTES = 16 << 20  # a safetensors header longer than this is refused before it is parsed
ADAPTER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
# adapter_config.json keys whose value may differ from the study's: where the site's base lives, which
# PEFT wrote the file, whether it was saved for inference, and dropout (0 at inference: ΔW is unchanged).
# target_modules is compared as a set. Every other key must equal the study's value.
FREE_KEYS = frozenset(
    {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "lora_dropout"}
)
PREFIX = "base_model.model."


def _show(value: Any) -> str:
    """A site-chosen value in an error line: repr (one line), at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def base_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the base model's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


# ------------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the data section
    end: int


def read_safetensors_header(data: bytes, dtypes: dict[str, int]) -> dict[str, HeaderEntry]:
    """The tensors of a safetensors buffer, checked without trusting it: the header length is bounded
    (≤ MAX_HEADER_BYTES and inside the buffer), the header is a JSON object (no NaN constants) of
    {name: {dtype, shape, data_offsets}} with `dtype` one of `dtypes` ({code: bytes per item}), each
    tensor's byte range its shape × item size, and the ranges tile the data section exactly (as the
    format requires). Raises ValueError(why) — callers add who sent it."""
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise ValueError(f"header length {size} exceeds the buffer or {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(data[8 : 8 + size], parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    entries, body = {}, len(data) - 8 - size
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError("__metadata__ is not a string map")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {_show(name)}: expected exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in dtypes:
            raise ValueError(f"tensor {_show(name)}: dtype {_show(dtype)} (expected {', '.join(dtypes)})")
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not ints or not all(type(v) is int and v >= 0 for v in [*shape, *offsets]):
            raise ValueError(f"tensor {_show(name)}: malformed shape or data_offsets")
        start, end = offsets
        if end - start != math.prod(shape) * dtypes[dtype]:
            raise ValueError(f"tensor {_show(name)}: data_offsets do not match its shape and dtype")
        entries[name] = HeaderEntry(dtype, tuple(shape), start, end)
    at = 0
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != at:
            raise ValueError("tensor data overlaps or leaves a hole")
        at = entry.end
    if at != body:
        raise ValueError(f"data section is {body} bytes, its tensors {at}")
    return entries


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"non-finite constant {name}", name, 0)


def buffer_tensor(data: bytes, header_size: int, entry: HeaderEntry, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a checked safetensors buffer, copied out (little-endian, as the format stores)."""
    start = 8 + header_size + entry.start
    raw = bytearray(data[start : start + entry.end - entry.start])
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.reshape(entry.shape)


# ---------------------------------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoraStudy:
    """The study's LoRA: what every site's adapter is held to (build it with `lora_study`).

    tensors: {PEFT state-dict name: shape} of an honest adapter (`base_model.model.<module>.lora_A.weight`
    (r, in), `….lora_B.weight` (out, r)); config: the canonical adapter_config.json (PEFT's own, for the
    study's settings, `base_model_name_or_path` = the study's base id, inference_mode true)."""

    r: int
    alpha: float
    use_rslora: bool
    tensors: dict[str, tuple[int, int]]
    config: dict[str, Any]

    @property
    def scale(self) -> float:
        """s of ΔW = s·B·A: alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def modules(self) -> list[str]:
        """The base weight names adapted (`model.layers.0.self_attn.q_proj.weight`), sorted."""
        return sorted({_module(k) for k in self.tensors})


def _module(key: str) -> str:
    """`base_model.model.X.lora_A.weight` → `X.weight` (the base weight it adapts)."""
    return key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] + ".weight"


def lora_study(settings: Any, base: Path, base_id: str) -> LoraStudy:
    """The LoraStudy of `settings` (medmerge.config.LoraSettings) on the base model folder `base`: PEFT
    itself builds the adapter on a meta-device copy of the base (no weights read), so the tensor names,
    shapes and config are exactly those an honest site's training saves. `base_id` is what the study
    calls the base (its `base_model`), written into the canonical config."""
    import warnings

    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from medmerge.models import model_kind
    from medmerge.train.model import lora_config

    if settings.use_dora:
        raise MedmergeError("train.lora.use_dora: DoRA adapters cannot be merged (ΔW depends on |W|)")
    kind = model_kind(base)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            auto.from_config(AutoConfig.from_pretrained(base)), lora_config(settings, kind, base_id)
        )
    peft = model.peft_config["default"]
    peft.base_model_name_or_path, peft.inference_mode = base_id, True
    config = json.loads(json.dumps(peft.to_dict(), default=sorted))  # sets → sorted lists, enums → str
    tensors = {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    if any(".lora_A." not in k and ".lora_B." not in k for k in tensors) or any(
        len(s) != 2 for s in tensors.values()
    ):
        raise MedmergeError(f"{base}: the study's LoRA holds more than lora_A / lora_B matrices")
    return LoraStudy(settings.r, float(settings.alpha), bool(settings.use_rslora), tensors, config)


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: A (r, in) and B (out, r) as sent (float32 copies), ΔW = scale·B·A (out, in)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A, float32."""
        return (self.b @ self.a).mul_(self.scale)


@dataclass(frozen=True)
class CheckedAdapter:
    """A site's adapter that passed validate_adapter: {base weight name: LoraFactors}, and the dtype
    each factor was sent in (kept when it is re-serialised)."""

    site: str
    factors: dict[str, LoraFactors]
    dtypes: dict[str, str] = field(default_factory=dict)  # PEFT tensor name → safetensors dtype code

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values())).a.shape[0]

    def deltas(self) -> dict[str, tuple[torch.Tensor, int]]:
        """{base weight name: (ΔW float32, rank r)}."""
        return {name: (f.delta(), f.a.shape[0]) for name, f in self.factors.items()}


def validate_adapter(
    site: str, config_bytes: bytes, weights_bytes: bytes, study: LoraStudy
) -> CheckedAdapter:
    """Refuse `site`'s adapter (MedmergeError, one line naming the site and the field) unless it is an
    adapter of the study's LoRA (module doc); return its factors with the study's scale."""

    def refuse(where: str, why: str) -> MedmergeError:
        return MedmergeError(f"site {site}: adapter refused ({where}: {why})")

    try:
        config = json.loads(config_bytes, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise refuse("adapter_config.json", f"not JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise refuse("adapter_config.json", "not a JSON object")
    for key, value in config.items():
        if key not in study.config:
            raise refuse("adapter_config.json", f"unknown key {_show(key)}")
        want = study.config[key]
        if key == "target_modules":
            same = isinstance(value, list) and isinstance(want, list) and sorted(map(str, value)) == want
            same = same or value == want
        else:
            same = key in FREE_KEYS or value == want
        if not same:
            raise refuse(f"adapter_config.json {key}", f"{_show(value)}, the study's is {_show(want)}")

    try:
        entries = read_safetensors_header(weights_bytes, ITEM_SIZE)
    except ValueError as why:
        raise refuse("adapter_model.safetensors", str(why)) from None
    extra = sorted(set(entries) - set(study.tensors))
    if extra:
        raise refuse("adapter_model.safetensors", f"tensor {_show(extra[0])} is no LoRA factor of the study")
    missing = sorted(set(study.tensors) - set(entries))
    if missing:
        raise refuse("adapter_model.safetensors", f"no tensor {missing[0]}")
    header_size = int.from_bytes(weights_bytes[:8], "little")
    tensors = {}
    for name, entry in entries.items():
        if entry.shape != study.tensors[name]:
            raise refuse(
                f"adapter_model.safetensors {name}", f"shape {entry.shape}, expected {study.tensors[name]}"
            )
        tensor = buffer_tensor(weights_bytes, header_size, entry, ADAPTER_DTYPES[entry.dtype]).to(
            torch.float32
        )
        if not bool(torch.isfinite(tensor).all()):
            raise refuse(f"adapter_model.safetensors {name}", "non-finite values (NaN or ±inf)")
        tensors[name] = tensor
    factors = {}
    for key in (k for k in study.tensors if ".lora_A." in k):
        b_key = key.replace(".lora_A.", ".lora_B.")
        factors[_module(key)] = LoraFactors(tensors[key], tensors[b_key], study.scale)
    return CheckedAdapter(site, factors, {name: e.dtype for name, e in entries.items()})


def canonical_adapter(
    checked: CheckedAdapter, study: LoraStudy, scales: dict[str, float] | None = None
) -> dict[str, bytes]:
    """{"adapter_config.json", "adapter_model.safetensors"} of a checked adapter as the coordinator
    forwards it: the study's canonical config (base id, pinned fields) and the factors re-serialised in
    the dtypes they came in, with B multiplied by `scales[module]` where given (ΔW scaled by it: the
    norm screen's clipping). Nothing of the site's own bytes (header metadata, config) passes through."""
    from safetensors.torch import save

    tensors = {}
    for key in study.tensors:
        module, factors = _module(key), checked.factors[_module(key)]
        dtype = ADAPTER_DTYPES[checked.dtypes.get(key, "F32")]
        if ".lora_A." in key:
            tensors[key] = factors.a.to(dtype).contiguous()
        else:
            scale = (scales or {}).get(module, 1.0)
            tensors[key] = (factors.b * scale if scale != 1.0 else factors.b).to(dtype).contiguous()
    config = json.dumps(study.config, indent=2, sort_keys=True).encode()
    return {"adapter_config.json": config, "adapter_model.safetensors": save(tensors)}


# ---------------------------------------------------------------- the checks the coordinator had before
def check_adapter(
    site: str, meta: dict[str, Any], blobs: dict[str, bytes], base_checksum: str, shapes: dict
) -> None:
    """Refuse `site`'s adapter (MedmergeError, one line) unless it was trained on this base and fits it.
    Shapes only: the coordinator's full check is validate_adapter (this one stays until it is wired)."""

    theirs = (meta.get("base") or {}).get("checksum")
    if theirs != base_checksum:
        raise MedmergeError(
            f"site {site}: adapter trained on another base model (checksum {str(theirs)[:12]}…, "
            f"expected {base_checksum[:12]}…)"
        )
    check_shapes(site, blobs, shapes)


def check_shapes(site: str, blobs: dict[str, bytes], shapes: dict) -> None:
    """Refuse `site`'s adapter (one line) unless its header is valid and every LoRA factor fits the base
    (shapes only; the full check is validate_adapter)."""
    try:
        entries = read_safetensors_header(blobs["adapter_model.safetensors"], ITEM_SIZE)
        json.loads(blobs["adapter_config.json"])
    except Exception as exc:  # noqa: BLE001 (any unreadable adapter is refused the same way)
        raise MedmergeError(f"site {site}: unreadable adapter ({type(exc).__name__})") from None
    for key, entry in entries.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_")[0].removeprefix(PREFIX)
        target = shapes.get(f"{module}.weight")
        if target is None or len(target) != 2:
            raise MedmergeError(
                f"site {site}: adapter tensor {_show(key)} adapts no 2-D weight of the base model"
            )
        out_features, in_features = target
        ok = entry.shape[1:] == (in_features,) if ".lora_A." in key else entry.shape[:1] == (out_features,)
        if len(entry.shape) != 2 or not ok:
            raise MedmergeError(
                f"site {site}: adapter tensor {_show(key)} has shape {entry.shape}, which does not fit "
                f"the base weight {module}.weight {target}"
            )


# ------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class StatisticsBounds:
    """What the coordinator knows of an honest site's statistics.

    max_tokens: the most tokens a Gram may sum (the study's statistics examples × (max_prompt_tokens +
    max_answer_tokens)); token_norm_sq: C when the sites clip every token's input to ‖x‖² ≤ C before it
    enters a Gram (then trace G ≤ C · tokens for every Gram); None when they do not clip (then only
    robust.screen_gram_scales bounds a Gram, against the other sites')."""

    max_tokens: int | None = None
    token_norm_sq: float | None = None

    @classmethod
    def for_study(
        cls, examples: int, max_prompt_tokens: int, max_answer_tokens: int, token_norm_sq: float | None = None
    ) -> StatisticsBounds:
        """The bounds of a study whose Grams sum at most `examples` training questions (its
        `federation.statistics.examples`), each at most max_prompt_tokens + max_answer_tokens tokens (its
        `train` settings: a causal input is prompt ‖ answer ‖ eos, the answer's eos within its budget; a
        seq2seq pair's encoder and decoder tokens together are no more)."""
        return cls(examples * (max_prompt_tokens + max_answer_tokens), token_norm_sq)


@dataclass(frozen=True)
class StatisticsSummary:
    """What check_statistics learnt of a site's statistics: the tokens it declared for its Grams and,
    per stored Gram, trace / tokens (the mean ‖x‖² of that Linear's input, in squared activation units)."""

    tokens: int
    mean_sq_norm: dict[str, float]


def check_statistics(
    site: str,
    blobs: dict[str, bytes],
    shapes: dict,
    kinds: list[str],
    bounds: StatisticsBounds | None = None,
) -> StatisticsSummary:
    """Refuse `site`'s shared statistics (one line) unless both files are there, the record describes
    the tensor file (format, size, SHA-256, the `kinds` asked for), every tensor fits the base (a Gram
    (in, in), a Fisher the shape of its weight, float32, keyed by a base weight name), every value is
    finite, a Gram is symmetric with diagonal ≥ 0, a Fisher ≥ 0, and the Grams' traces fit the tokens the
    site declared (module doc; `bounds`)."""
    from medmerge.site_stats import FORMAT, INFO_FILE, KINDS, SEPARATOR, TENSORS_FILE

    def refuse(why: str) -> MedmergeError:
        return MedmergeError(f"site {site}: shared statistics refused ({why})")

    if TENSORS_FILE not in blobs or INFO_FILE not in blobs:
        raise refuse(f"{TENSORS_FILE} and {INFO_FILE} expected")
    data = blobs[TENSORS_FILE]
    try:
        info = json.loads(blobs[INFO_FILE], parse_constant=_no_constant)
        entries = read_safetensors_header(data, {"F32": 4})
    except (ValueError, RecursionError) as exc:
        raise refuse(f"unreadable, {exc if isinstance(exc, ValueError) else type(exc).__name__}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise refuse(f"format {_show(info.get('format') if isinstance(info, dict) else None)}")
    if info.get("bytes") != len(data) or info.get("sha256") != hashlib.sha256(data).hexdigest():
        raise refuse("its record's size or SHA-256 does not match the tensor file")
    missing = sorted(set(kinds) - set(info.get("kinds") or ()))
    if missing:
        raise refuse(f"no {' and '.join(missing)} statistics")
    tokens = _declared_tokens(info)
    bounds = bounds or StatisticsBounds()
    if "gram" in kinds and (tokens is None or tokens < 1):
        raise refuse(f"tokens: {_show(tokens)}, expected the positive number of tokens its Grams sum")
    if bounds.max_tokens is not None and tokens is not None and tokens > bounds.max_tokens:
        raise refuse(f"tokens: {tokens} declared, more than the study's {bounds.max_tokens}")
    header_size, means = int.from_bytes(data[:8], "little"), {}
    for key, entry in entries.items():
        kind, _, name = key.partition(SEPARATOR)
        target = shapes.get(name)
        if kind not in KINDS or target is None or len(target) != 2:
            raise refuse(f"tensor {_show(key)} is no statistic of a 2-D base weight")
        expected = (target[1], target[1]) if kind == "gram" else tuple(target)
        if entry.shape != expected:
            raise refuse(f"tensor {key} is F32 {list(entry.shape)}, expected F32 {list(expected)}")
        tensor = buffer_tensor(data, header_size, entry, torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise refuse(f"tensor {key} has non-finite values")
        if kind == "fisher" and bool((tensor < 0).any()):
            raise refuse(f"tensor {key}: a Fisher has negative entries")
        if kind == "gram":
            means[name] = _check_gram(tensor, key, tokens or 1, bounds, refuse)
    for name, target in (info.get("aliases") or {}).items():
        if f"gram{SEPARATOR}{target}" not in entries or name not in shapes:
            raise refuse(f"Gram alias {_show(name)} -> {_show(target)} names no stored Gram of a base weight")
    return StatisticsSummary(tokens or 0, means)


def _declared_tokens(info: dict[str, Any]) -> int | None:
    """The tokens the record says its Grams sum: per_kind.gram.tokens (a count per token stream, e.g.
    input, or encoder and decoder: summed, which bounds every Gram), else `tokens`."""
    per_kind = ((info.get("per_kind") or {}).get("gram") or {}).get("tokens")
    values = list(per_kind.values()) if isinstance(per_kind, dict) else [info.get("tokens")]
    if not values or not all(type(v) is int for v in values):
        return None
    return sum(values)


def _check_gram(tensor: torch.Tensor, key: str, tokens: int, bounds: StatisticsBounds, refuse: Any) -> float:
    """Refuse a Gram that is not symmetric (to float rounding), has a negative diagonal, or whose trace
    exceeds C·tokens (with clipping); return trace / tokens."""
    diagonal = tensor.diagonal()
    if bool((diagonal < 0).any()):
        raise refuse(f"tensor {key}: a Gram has a negative diagonal entry")
    scale = float(tensor.abs().max())
    if float((tensor - tensor.T).abs().max()) > 1e-4 * max(scale, 1e-30):
        raise refuse(f"tensor {key}: a Gram is not symmetric")
    trace = float(diagonal.double().sum())
    if bounds.token_norm_sq is not None and trace > bounds.token_norm_sq * tokens * (1 + 1e-4):
        raise refuse(
            f"tensor {key}: trace {trace:.4g} exceeds C·tokens = {bounds.token_norm_sq:g} × {tokens} "
            "(each token's ‖x‖² is clipped to C)"
        )
    return trace / tokens
