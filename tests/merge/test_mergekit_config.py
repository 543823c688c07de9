"""mergekit configs as they are: each gives the tensors of its medmerge twin; refusals and warnings are
one line; every merge writes mergekit_config.yml, which reads back as the same merge; per-model density."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from medmerge.cli import main
from medmerge.config import MergeConfig, validate_config
from medmerge.errors import MedmergeError
from medmerge.merge import sparsify
from medmerge.merge.engine import merged_state
from medmerge.merge.mergekit import from_mergekit, load_merge_config, to_mergekit
from medmerge.merge.methods import generalized_task_arithmetic
from medmerge.model_card import read_front_matter


def _mk(method: str, models: list, base=None, **extra) -> dict:
    out = {"merge_method": method, "models": models, "dtype": "float32", **extra}
    if base is not None:
        out["base_model"] = str(base)
    return out


def _m(path, **params) -> dict:
    return {"model": str(path), **({"parameters": params} if params else {})}


def _mm(method: str, models: list, base=None, **extra) -> dict:
    out = {"method": method, "models": [{"path": str(p), "weight": w} for p, w in models], **extra}
    if base is not None:
        out["base_model"] = str(base)
    return out


# (id, mergekit config, medmerge config), as functions of (base, expert a, expert b)
CASES = [
    (
        "linear",
        lambda b, x, y: _mk("linear", [_m(x, weight=1.0), _m(y, weight=0.5)]),
        lambda b, x, y: _mm("linear", [(x, 1.0), (y, 0.5)]),
    ),
    (
        "linear-unnormalized-weights-sum-to-1",
        lambda b, x, y: _mk(
            "linear", [_m(x, weight=0.3), _m(y, weight=0.7)], parameters={"normalize": False}
        ),
        lambda b, x, y: _mm("linear", [(x, 0.3), (y, 0.7)]),
    ),
    (
        "slerp",  # mergekit: t = 0 is base_model
        lambda b, x, y: _mk("slerp", [_m(x), _m(y)], base=x, parameters={"t": 0.3}),
        lambda b, x, y: {"method": "slerp", "models": [str(x), str(y)], "parameters": {"t": 0.3}},
    ),
    (
        "task_arithmetic-base-listed",
        lambda b, x, y: _mk(
            "task_arithmetic",
            [_m(b), _m(x, weight=1.0), _m(y, weight=0.5)],
            base=b,
            parameters={"lambda": 0.8},
        ),
        lambda b, x, y: _mm("task_arithmetic", [(x, 1.0), (y, 0.5)], base=b, parameters={"lambda": 0.8}),
    ),
    (
        "ties-default-normalize",
        lambda b, x, y: _mk("ties", [_m(x, weight=1.0, density=0.3), _m(y, weight=0.7, density=0.3)], base=b),
        lambda b, x, y: _mm("ties", [(x, 1.0), (y, 0.7)], base=b, parameters={"density": 0.3}),
    ),
    (
        "ties-per-model-density",  # each model trims to its own density
        lambda b, x, y: _mk("ties", [_m(x, weight=1.0, density=0.5), _m(y, weight=0.7, density=0.3)], base=b),
        lambda b, x, y: _mm("ties", [(x, 1.0), (y, 0.7)], base=b, parameters={"density": [0.5, 0.3]}),
    ),
    (
        "ties-global-density-int8-mask",
        lambda b, x, y: _mk(
            "ties",
            [_m(x, weight=1.0), _m(y, weight=0.7)],
            base=b,
            parameters={"density": 0.4, "normalize": True, "int8_mask": True, "lambda": 1.2},
        ),
        lambda b, x, y: _mm("ties", [(x, 1.0), (y, 0.7)], base=b, parameters={"density": 0.4, "lambda": 1.2}),
    ),
    (
        "dare_ties",
        lambda b, x, y: _mk(
            "dare_ties",
            [_m(x, weight=1.0, density=0.5), _m(y, weight=1.0, density=0.5)],
            base=b,
            parameters={"normalize": True},
        ),  # fmt: skip
        lambda b, x, y: _mm("dare_ties", [(x, 1.0), (y, 1.0)], base=b, parameters={"density": 0.5}),
    ),
    (
        "dare_linear-no-rescale",
        lambda b, x, y: _mk(
            "dare_linear",
            [_m(x, weight=0.6, density=0.5), _m(y, weight=0.4, density=0.5)],
            base=b,
            parameters={"rescale": False},
        ),  # fmt: skip
        lambda b, x, y: _mm(
            "dare_linear", [(x, 0.6), (y, 0.4)], base=b, parameters={"density": 0.5, "rescale": False}
        ),
    ),
    (
        "breadcrumbs",
        lambda b, x, y: _mk(
            "breadcrumbs",
            [_m(x, weight=1.0), _m(y, weight=1.0)],
            base=b,
            parameters={"density": 0.8, "gamma": 0.05, "normalize": True},
        ),  # fmt: skip
        lambda b, x, y: _mm(
            "breadcrumbs",
            [(x, 1.0), (y, 1.0)],
            base=b,
            parameters={"density": 0.8, "gamma": 0.05, "normalize": True},
        ),  # fmt: skip
    ),
    (
        "breadcrumbs_ties-default-gamma",
        lambda b, x, y: _mk(
            "breadcrumbs_ties",
            [_m(x, weight=1.0, density=0.8), _m(y, weight=0.5, density=0.8)],
            base=b,
            parameters={"normalize": True},
        ),  # fmt: skip
        lambda b, x, y: _mm(
            "breadcrumbs_ties", [(x, 1.0), (y, 0.5)], base=b, parameters={"density": 0.8, "gamma": 0.01}
        ),
    ),
    (
        "della-default-epsilon",
        lambda b, x, y: _mk(
            "della", [_m(x, weight=1.0, density=0.5), _m(y, weight=1.0, density=0.5)], base=b
        ),
        lambda b, x, y: _mm(
            "della", [(x, 1.0), (y, 1.0)], base=b, parameters={"density": 0.5, "epsilon": 0.15}
        ),
    ),
    (
        "della_linear",
        lambda b, x, y: _mk(
            "della_linear",
            [_m(x, weight=1.0, density=0.6, epsilon=0.2), _m(y, weight=1.0, density=0.6, epsilon=0.2)],
            base=b,
            parameters={"lambda": 0.9},
        ),  # fmt: skip
        lambda b, x, y: _mm(
            "della_linear",
            [(x, 1.0), (y, 1.0)],
            base=b,
            parameters={"density": 0.6, "epsilon": 0.2, "lambda": 0.9},
        ),
    ),
    (
        "model_stock",
        lambda b, x, y: _mk("model_stock", [_m(b), _m(x), _m(y)], base=b),
        lambda b, x, y: _mm("model_stock", [(x, 1.0), (y, 1.0)], base=b),
    ),
    (
        "karcher",
        lambda b, x, y: _mk("karcher", [_m(x), _m(y)], parameters={"max_iter": 5}),
        lambda b, x, y: _mm("karcher", [(x, 1.0), (y, 1.0)], parameters={"max_iter": 5}),
    ),
    (
        "bfloat16-tokenizer-source-base",
        lambda b, x, y: _mk(
            "linear",
            [_m(x, weight=1.0), _m(y, weight=1.0)],
            base=b,
            dtype="bfloat16",
            tokenizer_source="base",
        ),
        lambda b, x, y: _mm("linear", [(x, 1.0), (y, 1.0)], base=b, dtype="bfloat16"),
    ),
]


@pytest.fixture(scope="module")
def trio(tiny_llama, llama_experts) -> tuple[Path, Path, Path]:
    return tiny_llama, llama_experts[0], llama_experts[1]


@pytest.mark.parametrize(("mergekit", "medmerge"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mergekit_config_gives_the_tensors_of_its_medmerge_twin(trio, mergekit, medmerge) -> None:
    translated = from_mergekit(mergekit(*trio), "mergekit.yml")
    twin = validate_config(medmerge(*trio), MergeConfig, "medmerge.yml")
    assert translated.dtype == twin.dtype
    ours, theirs = merged_state(translated), merged_state(twin)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("medmerge", [c[2] for c in CASES], ids=[c[0] for c in CASES])
def test_written_mergekit_config_reads_back_as_the_same_merge(trio, medmerge) -> None:
    config = validate_config(medmerge(*trio), MergeConfig, "medmerge.yml")
    base = Path(config.base_model) if config.base_model else None
    paths = [Path(m.path) for m in config.models]
    text = to_mergekit(config, base, paths, [False] * len(paths))
    again = from_mergekit(yaml.safe_load(text), "mergekit_config.yml")
    assert again.method == config.method and again.dtype == config.dtype
    assert [Path(m.path) for m in again.models] == [p.resolve() for p in paths]
    assert [m.weight for m in again.models] == [m.weight for m in config.models]
    assert again.method_params() == config.method_params()


def test_methods_mergekit_lacks_write_a_comment(trio) -> None:
    b, x, y = trio
    config = validate_config(_mm("tsv", [(x, 1.0), (y, 1.0)], base=b), MergeConfig, "c")
    text = to_mergekit(config, b, [x, y], [False, False])
    assert text.startswith("#") and "no mergekit equivalent" in text and yaml.safe_load(text) is None


REFUSED = [
    ("slices", {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "slices"),
    ("union-tokenizer", {"tokenizer_source": "union"}, "tokenizer_source"),
    ("t-gradient", {"merge_method": "slerp", "parameters": {"t": [0, 0.5, 1]}}, "gradient"),
    ("filter", {"parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}}, "per-filter"),
    ("per-filter-dict", {"parameters": {"density": {"filter": "mlp", "value": 0.5}}}, "per-filter"),
    ("unknown-method", {"merge_method": "nuslerp"}, "no medmerge equivalent"),
    ("dare-ties-sum", {"merge_method": "dare_ties"}, "normalize: false"),
    ("unknown-key", {"parameters": {"swapping": True}}, "swapping"),
    ("ties-l1-rescale", {"parameters": {"rescale": True}}, "rescale"),
]


@pytest.mark.parametrize(("change", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_fields_medmerge_cannot_honour_are_refused_in_one_line(trio, change, says) -> None:
    b, x, y = trio
    config = _mk("ties", [_m(x, weight=1.0, density=0.5), _m(y, weight=1.0, density=0.5)], base=b) | change
    with pytest.raises(MedmergeError) as exc:
        from_mergekit(config, "mk.yml")
    assert says in str(exc.value) and "\n" not in str(exc.value) and str(exc.value).startswith("mk.yml")


def test_per_model_gammas_that_differ_are_refused_in_one_line(trio) -> None:
    b, x, y = trio
    models = [_m(x, weight=1.0, density=0.9, gamma=0.01), _m(y, weight=1.0, density=0.9, gamma=0.02)]
    with pytest.raises(MedmergeError, match="per-model gamma differs"):
        from_mergekit(_mk("breadcrumbs_ties", models, base=b), "mk.yml")


def test_ignored_fields_warn_once(trio, caplog) -> None:
    b, x, y = trio
    config = _mk(
        "ties", [_m(x, weight=1.0, density=0.5), _m(y, weight=1.0)], base=b,
        parameters={"int8_mask": True, "density": 0.5}, tokenizer_source="base",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="medmerge.merge.mergekit"):
        from_mergekit(config, "mk.yml")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("int8_mask" in m for m in messages) == 1
    assert sum("tokenizer_source" in m for m in messages) == 1


def test_a_medmerge_config_still_loads(tmp_path, trio) -> None:
    b, x, y = trio
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(_mm("linear", [(x, 1.0), (y, 1.0)])))
    assert load_merge_config(path).method == "linear"
    (tmp_path / "bad.yaml").write_text("method: [")
    with pytest.raises(MedmergeError, match="invalid YAML"):
        load_merge_config(tmp_path / "bad.yaml")


def test_cli_merges_a_mergekit_file_and_writes_its_mergekit_config_and_card(tmp_path, trio, capsys) -> None:
    b, x, y = trio
    base = tmp_path / "base"  # a base with its own model card, which the merge must not copy
    base.mkdir()
    for file in b.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    (base / "README.md").write_text("---\nlicense: mit\n---\n# THE BASE MODEL'S OWN CARD\n")
    config = tmp_path / "mergekit.yml"
    config.write_text(
        yaml.safe_dump(
            _mk("ties", [_m(base), _m(x, weight=1.0, density=0.3), _m(y, weight=0.7, density=0.3)], base=base)
        )
    )
    out = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(out), "--quiet"]) == 0
    assert "ties" in capsys.readouterr().out
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["config"]["parameters"] == {"lambda": 1.0, "density": 0.3}
    written = load_merge_config(out / "mergekit_config.yml")
    assert written.method == "ties" and written.method_params() == load_merge_config(config).method_params()
    card = (out / "README.md").read_text()
    assert "THE BASE MODEL'S OWN CARD" not in card and "not medical advice" in card
    front = read_front_matter(out)
    assert front["library_name"] == "transformers" and front["license"] == "mit"
    assert {"medmerge", "medical", "ties", "merge"} <= set(front["tags"])
    assert front["medmerge"]["parameters"] == {"lambda": 1.0, "density": 0.3}


# ------------------------------------------------------------------------------- per-model density


def test_per_model_density_is_each_models_own_trim() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=generator)
    thetas = [base + torch.randn(16, 12, generator=generator) for _ in range(3)]
    densities, weights = [0.2, 0.5, 0.9], [1.0, 0.7, 0.4]
    for sparsifier, consensus in (("magnitude", True), ("bernoulli", False), ("della", True)):
        merged = generalized_task_arithmetic(
            base, [t.clone() for t in thetas], weights, sparsifier=sparsifier, density=densities,
            epsilon=0.05, sign_consensus=consensus, seed=3, name="w",
        ).tensor  # fmt: skip
        trimmed = []
        for i, (theta, d) in enumerate(zip(thetas, densities, strict=True)):
            tau = theta - base
            if sparsifier == "magnitude":
                tau_hat, _ = sparsify.magnitude(tau, d)
            elif sparsifier == "bernoulli":
                tau_hat, _ = sparsify.bernoulli(tau, d, sparsify.tensor_generator(3, "w", i))
            else:
                tau_hat, _ = sparsify.della(tau, d, 0.05, sparsify.tensor_generator(3, "w", i))
            trimmed.append(tau_hat)
        if consensus:
            elected = torch.where(sum(w * t for w, t in zip(weights, trimmed, strict=True)) >= 0, 1.0, -1.0)
            agree = [(torch.sign(t) == elected).float() for t in trimmed]
            num = sum(w * a * t for w, a, t in zip(weights, agree, trimmed, strict=True))
            den = sum(w * a for w, a in zip(weights, agree, strict=True))
            expected = base + num / torch.where(den == 0, 1.0, den)
        else:
            expected = base + sum(w * t for w, t in zip(weights, trimmed, strict=True))
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    kept = generalized_task_arithmetic(
        base,
        [t.clone() for t in thetas],
        weights,
        sparsifier="magnitude",
        density=densities,
        sign_consensus=True,
    ).stats["kept"]
    assert kept == [int(d * base.numel()) / base.numel() for d in densities]


def test_per_model_density_needs_one_value_per_model() -> None:
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="2 values for 3 models"):
        generalized_task_arithmetic(
            base, [torch.ones(4)] * 3, [1.0] * 3, sparsifier="magnitude", density=[0.5, 0.5]
        )
