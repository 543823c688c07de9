"""The registry is complete: every method has what the config, the engine, the search and the docs need."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medmerge.config import MergeConfig
from medmerge.config.base import StrictModel
from medmerge.merge.registry import METHODS, MethodSpec
from medmerge.merge.spaces import knob_names
from medmerge.site_stats import KINDS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "merging.md"
HEADING = re.compile(r"^### `([a-z_0-9]+)`$", re.MULTILINE)


def _doc_sections() -> dict[str, str]:
    """{method name: text of its `### \\`name\\`` section up to the next heading} of docs/merging.md."""
    text = DOCS.read_text(encoding="utf-8")
    sections = {}
    for match in HEADING.finditer(text):
        rest = text[match.end() :]
        end = re.search(r"^#{1,3} ", rest, re.MULTILINE)
        sections[match.group(1)] = rest[: end.start() if end else len(rest)].strip()
    return sections


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_complete(name: str) -> None:
    spec = METHODS[name]
    assert isinstance(spec, MethodSpec) and spec.name == name and spec.summary
    assert issubclass(spec.params, StrictModel)
    assert spec.driver in ("per_tensor", "greedy_soup")
    assert spec.base in ("required", "optional", "unused")
    if spec.driver == "per_tensor":
        assert callable(spec.merge), "a per-tensor method needs its tensor function"
        assert spec.space is not None, "a per-tensor method needs a search space (even one without knobs)"
    else:
        assert spec.merge is None and spec.needs_scorer
    spec.params.model_validate(spec.default)  # the default first trial is valid
    if spec.space is not None:
        knobs = knob_names(spec.space, 2)
        parameters = [k for k in knobs if not re.fullmatch(r"w\d+", k)]
        assert set(parameters) <= set(spec.default) or not parameters, "every parameter knob has a default"
        aliases = {f.alias or n for n, f in spec.params.model_fields.items()}
        assert set(parameters) <= aliases, f"knobs {parameters} are not parameters of {name}"
    assert spec.random_masks == ("seed" in spec.params.model_fields)
    assert isinstance(spec.needs_statistics, frozenset) and spec.needs_statistics <= set(KINDS)
    assert isinstance(spec.needs_factors, bool)
    assert spec.needs_extras == (bool(spec.needs_statistics) or spec.needs_factors)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_default_gives_a_valid_merge_config(name: str) -> None:
    spec = METHODS[name]
    n = max(spec.min_models, 2) if spec.max_models is None else spec.max_models
    parameters = dict(spec.default) | ({"seed": 0} if spec.random_masks else {})
    config = MergeConfig(
        method=name, base_model="base", models=[f"m{i}" for i in range(n)], parameters=parameters
    )
    assert config.method_params() == spec.params.model_validate(parameters)


def test_every_method_has_a_docs_section_with_its_formula() -> None:
    sections = _doc_sections()
    assert set(sections) == set(METHODS), "one `### `name`` section per registered method, and no other"
    for name, text in sections.items():
        assert "θ" in text, f"docs/merging.md: the section of {name} gives no formula"


def test_the_spec_checks_the_inputs_of_its_method() -> None:
    with pytest.raises(ValueError, match="slerp needs base_model"):
        MergeConfig(method="slerp", models=["a", "b"], parameters={"t": 0.5, "relative": True})
    MergeConfig(method="slerp", models=["a", "b"], parameters={"t": 0.5})
    with pytest.raises(ValueError, match="linear: the model weights sum to 0"):
        MergeConfig(method="linear", models=[{"path": "a", "weight": 1}, {"path": "b", "weight": -1}])
    with pytest.raises(ValueError, match="slerp needs 2 models, got 3"):
        MergeConfig(method="slerp", models=["a", "b", "c"], parameters={"t": 0.5})
    with pytest.raises(ValueError, match="model_stock needs at least 2 models"):
        MergeConfig(method="model_stock", base_model="b", models=["a"])
    with pytest.raises(ValueError, match="ties needs base_model"):
        MergeConfig(method="ties", models=["a"], parameters={"density": 0.5})


def test_an_incomplete_spec_is_refused() -> None:
    linear = METHODS["linear"]
    with pytest.raises(ValueError, match="tensor function"):
        MethodSpec("broken", "no tensor function", linear.params)
    with pytest.raises(ValueError, match="base_switch"):
        MethodSpec(
            "broken", "optional base without a switch", linear.params, merge=linear.merge, base="optional"
        )
