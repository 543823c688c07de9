"""mergekit configs: read a mergekit YAML as a medmerge merge, and write a merge as mergekit YAML.

`medmerge merge` takes a mergekit configuration as it is (recognised by its `merge_method` key):
`from_mergekit` translates it to a `MergeConfig` for every method both tools have, warns once about a
field it ignores (the result is the same without it) and refuses, in one line, a field it cannot honour.
`to_mergekit` writes the equivalent mergekit YAML of a medmerge merge (`mergekit_config.yml` beside every
merge), or a comment saying why there is none. The conventions that differ are in docs/merging.md,
section "mergekit configs".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medmerge.config import MergeConfig, load_config, validate_config
from medmerge.errors import MedmergeError
from medmerge.merge.methods import TaskVectorMerge
from medmerge.merge.registry import METHODS

log = logging.getLogger(__name__)

MERGEKIT_FILE = "mergekit_config.yml"
# mergekit's global parameters per method, with mergekit's defaults
_GTA_GLOBAL = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
GLOBAL: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "slerp": {"t": None},
    "model_stock": {"filter_wise": False},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "task_arithmetic": _GTA_GLOBAL,
    "ties": {**_GTA_GLOBAL, "normalize": True},
    "dare_ties": {**_GTA_GLOBAL, "rescale": True},
    "dare_linear": {**_GTA_GLOBAL, "rescale": True},
    "breadcrumbs": _GTA_GLOBAL,
    "breadcrumbs_ties": _GTA_GLOBAL,
    "della": {**_GTA_GLOBAL, "normalize": True, "rescale": True},
    "della_linear": {**_GTA_GLOBAL, "rescale": True},
}
# mergekit's per-model parameters per method, with mergekit's defaults (None: required, taken as 1)
_GTA_MODEL = {"weight": None, "density": 1.0}
PER_MODEL: dict[str, dict[str, Any]] = {
    "linear": {"weight": None},
    "slerp": {},
    "model_stock": {},
    "karcher": {},
    **{m: _GTA_MODEL for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear")},
    **{m: {**_GTA_MODEL, "gamma": 0.01} for m in ("breadcrumbs", "breadcrumbs_ties")},
    **{m: {**_GTA_MODEL, "epsilon": 0.15} for m in ("della", "della_linear")},
}
_TASK_VECTOR = [m for m in GLOBAL if isinstance(METHODS[m].merge, TaskVectorMerge)]
CONSENSUS = tuple(m for m in _TASK_VECTOR if METHODS[m].consensus)  # TIES sign election (registry)
LINEAR_FAMILY = tuple(m for m in _TASK_VECTOR if not METHODS[m].consensus)
RANDOM = tuple(m for m in GLOBAL if METHODS[m].random_masks)  # random masks drawn from `seed`
TOP_LEVEL = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template", "slices", "modules",
}  # fmt: skip
MEDMERGE_KEYS = ("output", "rank", "shard_mb")  # medmerge settings a mergekit file may add
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}  # fmt: skip


def is_mergekit(data: Any) -> bool:
    """Whether a parsed YAML config is in mergekit's schema (it names `merge_method`)."""
    return isinstance(data, dict) and "merge_method" in data


def load_merge_config(path: str | Path) -> MergeConfig:
    """A `medmerge merge` config file in medmerge's schema or in mergekit's (translated, see module doc)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None  # load_config reports it in its own words
    if not is_mergekit(data):
        return load_config(path, MergeConfig)
    return from_mergekit(data, str(path))


def _scalar(value: Any, where: str) -> Any:
    """A parameter value medmerge can honour: a number or bool; gradients (lists) and filters refused."""
    if isinstance(value, list | dict):
        filters = isinstance(value, dict) or any(isinstance(v, dict) for v in value)
        kind = "a per-filter value" if filters else "a gradient (list)"
        raise MedmergeError(
            f"{where}: {kind} cannot be honoured (medmerge applies one value to every tensor); give a number"
        )
    if value is not None and not isinstance(value, int | float):
        raise MedmergeError(f"{where}: expected a number or true/false, found {value!r}")
    return value


def _model_path(ref: Any, base: str | None, where: str) -> str:
    """A mergekit model reference as a medmerge input: a path or Hub id; `model+lora` as the adapter,
    which medmerge applies to base_model (so `model` must be base_model)."""
    if not isinstance(ref, str):
        raise MedmergeError(f"{where}: expected a model path or Hub id, found {type(ref).__name__}")
    model, plus, lora = ref.partition("+")
    if not plus:
        return ref
    if base is None or not _same(model, base):
        raise MedmergeError(
            f"{where}: {ref!r} applies a LoRA to {model!r}; medmerge applies adapters to base_model "
            f"({base!r}): give the adapter folder as the model and its base as base_model"
        )
    return lora


def _same(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _agreed(values: Sequence[Any], name: str, where: str) -> Any:
    """The one value of a per-model parameter that medmerge takes once per merge."""
    if any(v != values[0] for v in values[1:]):
        raise MedmergeError(
            f"{where}: per-model {name} differs between models ({', '.join(map(str, values))}); medmerge "
            f"takes one {name} per merge"
        )
    return values[0]


def from_mergekit(data: dict[str, Any], where: str = "config") -> MergeConfig:
    """The MergeConfig of a mergekit configuration (parsed YAML); warns once per ignored field and
    raises a one-line MedmergeError for a field medmerge cannot honour."""
    medmerge, warnings = translate(data, where)
    for warning in warnings:
        log.warning("%s: %s", where, warning)
    return validate_config(medmerge, MergeConfig, where)


def translate(data: dict[str, Any], where: str = "config") -> tuple[dict[str, Any], list[str]]:
    """(medmerge config dict, warnings) of a mergekit configuration."""
    warnings: list[str] = []
    unknown = sorted(set(data) - TOP_LEVEL - set(MEDMERGE_KEYS))
    if unknown:
        raise MedmergeError(f"{where}: unknown mergekit key(s) {', '.join(unknown)}")
    method = data["merge_method"]
    if method not in GLOBAL:
        raise MedmergeError(
            f"{where}: merge_method {method!r} has no medmerge equivalent (mergekit methods medmerge "
            f"reads: {', '.join(GLOBAL)})"
        )
    for key, why in (
        ("slices", "layer slices (frankenmerges) are not supported; medmerge merges whole models"),
        ("modules", "per-module definitions are not supported; medmerge merges whole models"),
        ("tokenizer", "tokenizer merging is not supported; medmerge keeps the reference model's tokenizer"),
        ("chat_template", "medmerge keeps the reference model's chat template"),
    ):
        if data.get(key) is not None:
            raise MedmergeError(f"{where}: {key}: {why}")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise MedmergeError(f"{where}: base_model: expected a model path or Hub id")
    entries = data.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise MedmergeError(f"{where}: models: expected a list of {{model: PATH, parameters: {{…}}}}")
    globals_ = data.get("parameters") or {}
    if not isinstance(globals_, dict):
        raise MedmergeError(f"{where}: parameters: expected a mapping")
    allowed_global, allowed_model = GLOBAL[method], PER_MODEL[method]
    for key in globals_:
        if key not in allowed_global and key not in allowed_model:
            raise MedmergeError(f"{where}: parameters.{key} is not a parameter of mergekit's {method}")
        _scalar(globals_[key], f"{where}: parameters.{key}")
    settings = {k: _scalar(globals_.get(k, d), f"{where}: parameters.{k}") for k, d in allowed_global.items()}

    inputs: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(entries):
        at = f"{where}: models[{i}]"
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise MedmergeError(f"{at}: expected {{model: PATH, parameters: {{…}}}}")
        own = entry.get("parameters") or {}
        for key in own:
            if key not in allowed_model:
                raise MedmergeError(
                    f"{at}.parameters.{key} is not a per-model parameter of mergekit's {method}"
                )
        values = {
            k: _scalar(own.get(k, globals_.get(k, d)), f"{at}.parameters.{k}")
            for k, d in allowed_model.items()
        }
        inputs.append((_model_path(entry["model"], base, f"{at}.model"), values))
    if base is not None and method not in ("linear", "karcher"):
        # mergekit never takes the base's task vector (it is 0); slerp's base is its t = 0 end
        inputs = [(p, v) for p, v in inputs if not _same(p, base)]

    out: dict[str, Any] = {"method": method}
    parameters: dict[str, Any] = {}
    if method == "slerp":
        if base is None or len(inputs) != 1:
            raise MedmergeError(
                f"{where}: slerp needs base_model and one other model (mergekit's t = 0 is the base)"
            )
        if settings["t"] is None:
            raise MedmergeError(f"{where}: parameters.t is required by slerp")
        out["models"] = [{"path": base}, {"path": inputs[0][0]}]
        parameters["t"] = settings["t"]
    else:
        weights = [1.0 if v.get("weight") is None else float(v["weight"]) for _, v in inputs]
        out["models"] = [{"path": p, "weight": w} for (p, _), w in zip(inputs, weights, strict=True)]
        if base is not None:
            out["base_model"] = base
        parameters = _method_parameters(method, settings, inputs, weights, where, warnings)
    if parameters:
        out["parameters"] = parameters
    out.update(_dtype(data, where))
    _tokenizer_source(data, base if base is not None else inputs[0][0], where, warnings)
    out.update({k: data[k] for k in MEDMERGE_KEYS if k in data})
    return out, warnings


def _method_parameters(
    method: str,
    settings: dict[str, Any],
    inputs: list[tuple[str, dict[str, Any]]],
    weights: list[float],
    where: str,
    warnings: list[str],
) -> dict[str, Any]:
    """medmerge's parameters of a mergekit method other than slerp."""
    if method == "linear":
        if not settings["normalize"] and not math.isclose(sum(weights), 1.0):
            raise MedmergeError(
                f"{where}: parameters.normalize: false (Σ w_i θ_i without dividing by Σ w_i = "
                f"{sum(weights):g}) is not a medmerge linear merge; use normalize: true or weights summing "
                "to 1"
            )
        return {}
    if method in ("model_stock", "karcher"):
        return {k: v for k, v in settings.items() if v != GLOBAL[method][k]}
    if settings["int8_mask"]:
        warnings.append(
            "parameters.int8_mask is ignored (medmerge's masks are boolean; the result is the same)"
        )
    out: dict[str, Any] = {"lambda": settings["lambda"]}
    values = {k: [v[k] for _, v in inputs] for k in PER_MODEL[method] if k != "weight"}
    for name in values:  # density may differ per model (each τ_i trimmed to its own); the others may not
        differs = name == "density" and len(set(values[name])) > 1
        out[name] = list(values[name]) if differs else _agreed(values[name], name, where)
    if method in CONSENSUS and not settings["normalize"]:
        raise MedmergeError(
            f"{where}: parameters.normalize: false ({method}: the sum of the agreeing entries) is not "
            "implemented; medmerge takes their weighted mean (normalize: true)"
        )
    if method in LINEAR_FAMILY:
        out["normalize"] = bool(settings["normalize"])
    if method in RANDOM:
        out["rescale"] = bool(settings["rescale"])
        warnings.append(
            f"{method}: random masks come from medmerge's seeded generators (seed 0) and survivors are "
            "divided by their keep probability; mergekit draws from torch's global RNG and rescales to the "
            "L1 norm, so the tensors differ from mergekit's (docs/merging.md, mergekit configs)"
        )
    elif settings["rescale"]:
        raise MedmergeError(
            f"{where}: parameters.rescale: true (mergekit's L1 rescale) is not available for {method}"
        )
    if method == "task_arithmetic" and out.pop("density") != 1.0:
        warnings.append("models[].parameters.density is ignored by task_arithmetic (as in mergekit)")
    return out


def _dtype(data: dict[str, Any], where: str) -> dict[str, str]:
    """medmerge's output dtype: mergekit's out_dtype, else its dtype (medmerge computes in float32)."""
    name = data.get("out_dtype") or data.get("dtype")
    if name is None:
        return {}
    if name not in DTYPES:
        raise MedmergeError(f"{where}: dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return {"dtype": DTYPES[name]}


def _tokenizer_source(data: dict[str, Any], reference: str, where: str, warnings: list[str]) -> None:
    source = data.get("tokenizer_source")
    if source is None:
        return
    if source == "base" or (isinstance(source, str) and _same(source, reference)):
        warnings.append(
            f"tokenizer_source: {source} is ignored: medmerge keeps the tokenizer of {reference} "
            "(the base model), which is the same"
        )
        return
    raise MedmergeError(
        f"{where}: tokenizer_source: {source!r} cannot be honoured; medmerge keeps the base model's "
        "tokenizer (use tokenizer_source: base, or leave it out)"
    )


# ------------------------------------------------------------------------------- medmerge → mergekit


def to_mergekit(
    config: MergeConfig, base: Path | None, models: Sequence[Path], adapters: Sequence[bool]
) -> str:
    """The mergekit YAML of a medmerge merge of `models` (resolved folders; `adapters`: which are LoRA
    adapters, written as `base+adapter`) on `base`, or a YAML comment saying why mergekit cannot run it."""
    method = config.method
    why = _no_equivalent(config)
    if why:
        return f"# {why}: this merge has no mergekit equivalent.\n"
    notes = [
        "# The medmerge merge in merge.json, for mergekit (mergekit-yaml mergekit_config.yml OUT).",
        '# Conventions that differ: docs/merging.md, section "mergekit configs".',
    ]

    def ref(path: Path, adapter: bool) -> str:
        return f"{base.resolve()}+{path.resolve()}" if adapter and base is not None else str(path.resolve())

    refs = [ref(p, a) for p, a in zip(models, adapters, strict=True)]
    params = config.method_params().model_dump(by_alias=True)
    out: dict[str, Any] = {"merge_method": method}
    if method == "slerp":
        out["base_model"] = refs[0]
        out["models"] = [{"model": r} for r in refs]
        out["parameters"] = {"t": params["t"]}
    else:
        if base is not None:
            out["base_model"] = str(base.resolve())
        shared = {k: params[k] for k in ("density", "gamma", "epsilon") if k in params}
        weighted = method not in ("model_stock", "karcher")
        out["models"] = []
        for i, (r, m) in enumerate(zip(refs, config.models, strict=True)):
            own = {k: v[i] if isinstance(v, list) else v for k, v in shared.items()}  # per-model density
            out["models"].append(
                {"model": r, **({"parameters": {"weight": m.weight, **own}} if weighted else {})}
            )
        out["parameters"] = _global_parameters(method, params)
        if method in RANDOM:
            notes.append(
                "# Random masks: mergekit draws its own (--random-seed) and rescales to the L1 norm."
            )
    out["dtype"] = "float32"
    if config.dtype != "float32":
        out["out_dtype"] = config.dtype
    if config.output == "lora":
        notes.append(
            f"# medmerge wrote a LoRA adapter (rank {config.rank}); mergekit writes the full merged model "
            "(mergekit-extract-lora can factor it)."
        )
    body = yaml.safe_dump(out, sort_keys=False, default_flow_style=False, width=1000)
    return "\n".join(notes) + "\n" + body


def _no_equivalent(config: MergeConfig) -> str | None:
    params = config.parameters
    if config.method not in GLOBAL:
        return f"medmerge method {config.method!r} is not a mergekit method"
    if config.method == "slerp" and (params.get("relative") or params.get("rowwise")):
        return "slerp with relative or rowwise is not in mergekit"
    weights = [m.weight for m in config.models]
    if config.method == "karcher" and any(w != weights[0] for w in weights):
        return "mergekit's karcher takes no weights"
    return None


def _global_parameters(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "linear":
        return {"normalize": True}
    if method in ("model_stock", "karcher"):
        return {k: params[k] for k in GLOBAL[method] if k in params}
    return {
        "normalize": True if method in CONSENSUS else params["normalize"],
        "rescale": params["rescale"] if method in RANDOM else False,
        "lambda": params["lambda"],
    }
