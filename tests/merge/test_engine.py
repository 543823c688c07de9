"""End-to-end merges of tiny random T5 and Llama models, the checks before any work, the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from medmerge.cli import main
from medmerge.config import MergeConfig, validate_config
from medmerge.errors import MedmergeError
from medmerge.merge import merge_models
from medmerge.merge.tensors import folder_tensors, read_tensor


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: read_tensor(i) for n, i in folder_tensors(folder).items()}


def _write_config(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cli_ties_merge_end_to_end(tmp_path, family, request, capsys):
    base = request.getfixturevalue(f"tiny_{family}")
    experts = request.getfixturevalue(f"{family}_experts")
    config = _write_config(
        tmp_path / "ties.yaml",
        method="ties",
        base_model=str(base),
        models=[{"path": str(experts[0]), "weight": 1.0}, {"path": str(experts[1]), "weight": 0.7}],
        parameters={"density": 0.2, "lambda": 1.0},
        dtype="float32",
    )
    out = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(out), "--quiet"]) == 0
    assert "ties" in capsys.readouterr().out
    # the same numbers as the pure function, tensor by tensor
    from medmerge.merge.methods import generalized_task_arithmetic

    merged, b, e0, e1 = _weights(out), _weights(base), _weights(experts[0]), _weights(experts[1])
    assert merged.keys() == b.keys()
    for name in b:
        expected = generalized_task_arithmetic(
            b[name],
            [e0[name], e1[name]],
            [1.0, 0.7],
            sparsifier="magnitude",
            density=0.2,
            sign_consensus=True,
        ).tensor
        torch.testing.assert_close(merged[name], expected)
    # a loadable model with the base's tokenizer, and a manifest
    from medmerge.models import load_model, load_tokenizer

    model = load_model(out)
    tokenizer = load_tokenizer(out)
    ids = tokenizer("What is asthma ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if family == "t5":
            model(input_ids=ids, decoder_input_ids=ids[:, :2])
        else:
            model(input_ids=ids)
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["config"]["method"] == "ties"
    assert len(manifest["inputs"]["sha256"]) == 3
    some = next(iter(manifest["tensors"].values()))
    assert {"tau_norm", "kept", "sign_conflicts"} <= set(some)
    assert 0.19 < manifest["summary"]["mean_kept"] <= 0.2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary left


def test_output_dtype_and_shards(tmp_path, tiny_llama, llama_experts):
    config = MergeConfig(
        method="linear", models=[str(p) for p in llama_experts], dtype="bfloat16", shard_mb=0.05
    )
    out = merge_models(config, tmp_path / "bf16", progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = _weights(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    e0, e1 = _weights(llama_experts[0]), _weights(llama_experts[1])
    for name, tensor in merged.items():
        assert torch.equal(tensor, ((e0[name] + e1[name]) / 2).to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_every_method_runs_end_to_end_on_llama(tmp_path, tiny_llama, llama_experts):
    params = {"slerp": {"t": 0.5}, "karcher": {}, "model_stock": {}, "linear": {}, "task_arithmetic": {}}
    for method in [
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ]:
        params[method] = {"density": 0.5}
    for method, p in params.items():
        config = MergeConfig(
            method=method, base_model=str(tiny_llama), models=[str(e) for e in llama_experts], parameters=p
        )
        out = merge_models(config, tmp_path / method, progress=False)
        assert _weights(out).keys() == _weights(tiny_llama).keys()


def test_dare_merges_are_reproducible(tmp_path, tiny_llama, llama_experts):
    config = MergeConfig(
        method="dare_ties",
        base_model=str(tiny_llama),
        models=[str(e) for e in llama_experts],
        parameters={"density": 0.3, "seed": 4},
    )
    one = _weights(merge_models(config, tmp_path / "one", progress=False))
    two = _weights(merge_models(config, tmp_path / "two", progress=False))
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_output_is_refused_when_present_unless_overwrite(tmp_path, llama_experts):
    config = MergeConfig(method="linear", models=[str(e) for e in llama_experts])
    out = merge_models(config, tmp_path / "out", progress=False)
    with pytest.raises(MedmergeError, match="already exists"):
        merge_models(config, out, progress=False)
    merge_models(config, out, overwrite=True, progress=False)


def _copy_with(tmp_path: Path, source: Path, name: str, change) -> Path:
    """Copy a model folder, then let `change(tensors)` edit its weights."""
    out = tmp_path / name
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_llama, llama_experts):
    bad = _copy_with(
        tmp_path, llama_experts[0], "bad", lambda t: t.update({"model.norm.weight": torch.ones(7)})
    )
    config = MergeConfig(
        method="ties", base_model=str(tiny_llama), models=[str(bad)], parameters={"density": 0.5}
    )
    with pytest.raises(MedmergeError, match=r"model\.norm\.weight has shape \[7\]"):
        merge_models(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path, tiny_llama, llama_experts):
    bad = _copy_with(tmp_path, llama_experts[0], "bad", lambda t: t.pop("lm_head.weight"))
    config = MergeConfig(method="linear", models=[str(llama_experts[1]), str(bad)])
    with pytest.raises(MedmergeError, match=r"lacks lm_head\.weight.*ties lm_head"):
        merge_models(config, tmp_path / "out", progress=False)


def test_nan_in_an_input_is_refused(tmp_path, llama_experts):
    def poison(t):
        t["model.norm.weight"][3] = float("nan")

    bad = _copy_with(tmp_path, llama_experts[0], "bad", poison)
    config = MergeConfig(method="linear", models=[str(llama_experts[1]), str(bad)])
    with pytest.raises(MedmergeError, match=r"bad: tensor model\.norm\.weight has 1 NaN/Inf"):
        merge_models(config, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob(".out*"))


def test_different_tokenizers_are_reported_token_by_token(tmp_path, llama_experts):
    other = tmp_path / "other"
    shutil.copytree(llama_experts[0], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    config = MergeConfig(method="linear", models=[str(llama_experts[1]), str(other)])
    with pytest.raises(MedmergeError, match=r"tokenizer differs .* on 2 tokens: ") as info:
        merge_models(config, tmp_path / "out", progress=False)
    assert repr(first) in str(info.value) and repr(second) in str(info.value)


def test_architecture_mismatch(tmp_path, tiny_llama, tiny_t5):
    config = MergeConfig(method="linear", models=[str(tiny_llama), str(tiny_t5)])
    with pytest.raises(MedmergeError, match="model_type is 't5'"):
        merge_models(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"method": "tiez", "models": ["a"]},
            "unknown merge method 'tiez' (choices: linear, soup_greedy, slerp",
        ),
        (
            {"method": "ties", "base_model": "b", "models": ["a"], "parameters": {"density": 0.2, "k": 1}},
            "k: Extra",
        ),
        ({"method": "ties", "models": ["a"], "parameters": {"density": 0.2}}, "ties needs base_model"),
        ({"method": "ties", "base_model": "b", "models": ["a"]}, "density: Field required"),
        ({"method": "slerp", "models": ["a"], "parameters": {"t": 0.5}}, "slerp needs 2 models, got 1"),
        ({"method": "linear", "models": ["a"], "output": "lora"}, "output: lora needs rank"),
        ({"method": "linear", "models": [{"path": "a", "wieght": 1}]}, "wieght: Extra"),
        (
            {
                "method": "della",
                "base_model": "b",
                "models": ["a"],
                "parameters": {"density": 0.9, "epsilon": 0.2},
            },
            "density ± epsilon",
        ),
    ],
)
def test_config_errors_are_one_line(config, message):
    with pytest.raises(MedmergeError) as info:
        validate_config(config, MergeConfig, "merge.yaml")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("merge.yaml: ")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    config = _write_config(tmp_path / "bad.yaml", method="nope", models=["x"])
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "unknown merge method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "where"),
    [
        ("ties", "expert"),
        ("ties", "base"),
        ("model_stock", "expert"),
        ("model_stock", "base"),
        ("linear", "expert"),
    ],
)
def test_nan_is_refused_without_a_separate_input_pass(tmp_path, tiny_llama, llama_experts, where, method):
    """Task-vector methods check ‖τ_i‖, linear its output; both then name the input that holds the Inf."""

    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][1, 2] = float("inf")

    bad = _copy_with(tmp_path, llama_experts[0] if where == "expert" else tiny_llama, "bad", poison)
    base, expert = (str(tiny_llama), str(bad)) if where == "expert" else (str(bad), str(llama_experts[0]))
    models = [expert, str(llama_experts[1])] if method != "ties" else [expert]
    parameters = {"density": 0.5} if method == "ties" else {}
    config = MergeConfig(method=method, base_model=base, models=models, parameters=parameters)
    with pytest.raises(
        MedmergeError, match=r"bad: tensor model\.layers\.0\.mlp\.up_proj\.weight has 1 NaN/Inf"
    ):
        merge_models(config, tmp_path / "out", progress=False)
