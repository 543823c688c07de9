"""RegMean++ (`regmean_plus_plus`): block 0 is RegMean, later blocks are not; the Grams checked against
inputs computed by hand through the merged model; identities; the CLI with LoRA experts in both output
spaces; refusals; the registry entry and its search space."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medmerge.config import MergeConfig
from medmerge.errors import MedmergeError
from medmerge.merge import merge_models, regmean_pp
from medmerge.merge.registry import METHODS, MethodSpec
from medmerge.merge.spaces import knob_names
from medmerge.merge.statistics import input_shortfall, open_statistics
from medmerge.merge.tensors import folder_tensors, read_tensor
from medmerge.models import load_model
from tests.merge.conftest import make_adapter
from tests.tiny import build_tokenizer

EXAMPLES, BATCH = 6, 4  # questions per expert, and per forward (padding occurs: lengths differ)
Q_PROJ = "model.layers.{}.self_attn.q_proj.weight"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: read_tensor(i).to(torch.float32) for n, i in folder_tensors(folder).items()}


def _manifest(folder: Path, qa: Path, base: str | None = None) -> Path:
    """The part of a medmerge expert manifest RegMean++ reads: the training config (its data SPECs)."""
    config = {"model": base or str(folder), "data": {"specs": [f"jsonl:{qa}"]}}
    (folder / "manifest.json").write_text(json.dumps({"config": config, "inputs": {"base_model": base}}))
    return folder


def _llama(
    out: Path, seed: int, layers: int, qa: Path, embed: torch.Tensor | None = None, tied: bool = False
) -> Path:
    """A tiny random Llama expert (hidden 32, untied head unless `tied`) with `layers` blocks and a
    manifest; `embed` replaces its input embeddings (experts that share them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("causal")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if embed is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(embed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return _manifest(out, qa)


def _experts(root: Path, layers: int, qa: Path) -> list[Path]:
    """Two experts with other blocks and heads but the same embeddings (so block 0 reads the same input)."""
    first = _llama(root / f"{layers}-a", 1, layers, qa)
    embed = load_model(first).model.embed_tokens.weight.detach()
    return [first, _llama(root / f"{layers}-b", 2, layers, qa, embed=embed)]


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tiny_qa_jsonl) -> dict[int, list[Path]]:
    """{layers: two full experts with manifests and RegMean's site Grams on the same questions}."""
    from medmerge.train.statistics import compute_statistics

    root = tmp_path_factory.mktemp("regmean-pp")
    found = {layers: _experts(root, layers, tiny_qa_jsonl) for layers in (1, 2)}
    for folder in [f for pair in found.values() for f in pair]:
        compute_statistics(folder, kinds=["gram"], max_examples=EXAMPLES, batch_size=BATCH, progress=False)
    return found


@pytest.fixture
def recorded(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """{weight name: [G_i per input]} of every tensor the layer pass merged with Grams."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = regmean_pp.layer_pass

    def spy(model, sources, data, merge, *args, **kwargs):
        def recording(names, grams):
            for name in names:
                found = [g.read("gram", name) for g in grams]
                if grams and all(g is not None for g in found):
                    seen[name] = found
            return merge(names, grams)

        return original(model, sources, data, recording, *args, **kwargs)

    monkeypatch.setattr(regmean_pp, "layer_pass", spy)
    return seen


def _merge(
    tmp_path: Path, method: str, models: list, name: str | None = None, **kw
) -> dict[str, torch.Tensor]:
    parameters = {"alpha": 0.9} | ({"examples": EXAMPLES, "batch_size": BATCH} if method != "regmean" else {})
    config = MergeConfig(method=method, models=models, parameters=parameters, **kw)
    return _weights(merge_models(config, tmp_path / (name or method), progress=False))


@pytest.mark.parametrize("layers", [1, 2])
def test_block_0_is_regmean_and_the_next_block_is_not(tmp_path, experts, recorded, layers):
    pair = [str(e) for e in experts[layers]]
    regmean = _merge(tmp_path, "regmean", pair)
    plus = _merge(tmp_path, "regmean_plus_plus", pair)
    sites = [open_statistics(e) for e in experts[layers]]
    assert plus.keys() == regmean.keys()
    for name in [n for n in plus if n.startswith("model.layers.0.")]:  # nothing merged precedes block 0
        torch.testing.assert_close(plus[name], regmean[name], rtol=1e-6, atol=1e-7)
    for site, gram in zip(sites, recorded[Q_PROJ.format(0)], strict=True):
        torch.testing.assert_close(gram.float(), site.read("gram", Q_PROJ.format(0)), rtol=1e-6, atol=1e-6)
    embed = "model.embed_tokens.weight"  # outside the blocks: the average (of equal embeddings here)
    torch.testing.assert_close(plus[embed], regmean[embed])
    if layers == 2:  # block 1 reads merged block 0's outputs, not each expert's own
        for site, gram in zip(sites, recorded[Q_PROJ.format(1)], strict=True):
            own = site.read("gram", Q_PROJ.format(1)).double()
            assert float((gram - own).norm() / own.norm()) > 1e-2
        assert not torch.allclose(plus[Q_PROJ.format(1)], regmean[Q_PROJ.format(1)], atol=1e-4)
    assert not torch.allclose(plus["lm_head.weight"], regmean["lm_head.weight"], atol=1e-4)


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    return x.T @ x


def test_grams_are_the_inputs_the_merged_model_feeds_each_linear(tmp_path, experts, recorded):
    pair = experts[2]
    out = tmp_path / "plus"
    config = MergeConfig(
        method="regmean_plus_plus",
        models=[{"path": str(pair[0]), "weight": 1.0}, {"path": str(pair[1]), "weight": 0.5}],
        parameters={"alpha": 0.8, "examples": EXAMPLES, "batch_size": BATCH},
    )
    merged = load_model(merge_models(config, out, progress=False)).eval()
    for i, folder in enumerate(pair):
        expert = load_model(folder).eval()
        examples, _ = regmean_pp.expert_examples(folder, EXAMPLES)
        block_1, head = [], []
        with torch.no_grad():
            for example in examples:  # one at a time: no padding at all
                ids = torch.tensor([example["input_ids"]])
                hidden = merged(ids, output_hidden_states=True).hidden_states
                # X of layer 1's q_proj: candidate i's own norm of what the merged block 0 outputs
                block_1.append(expert.model.layers[1].input_layernorm(hidden[1]))
                head.append(hidden[-1])  # merged final norm of merged blocks: the head's input
        got = recorded[Q_PROJ.format(1)][i]
        torch.testing.assert_close(got, _gram(block_1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recorded["lm_head.weight"][i], _gram(head), rtol=1e-5, atol=1e-5)
    assert len(recorded[Q_PROJ.format(1)]) == 2


def test_identical_experts_and_a_single_expert_give_that_expert(tmp_path, experts):
    expert = str(experts[2][0])
    own = _weights(experts[2][0])
    twice = [{"path": expert, "weight": 0.3}, {"path": expert, "weight": 0.7}]
    for name, models in {"twice": twice, "once": [expert]}.items():
        merged = _merge(tmp_path, "regmean_plus_plus", models, name=name)
        assert merged.keys() == own.keys()
        for tensor in own:
            torch.testing.assert_close(merged[tensor], own[tensor], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_leave_no_head_to_solve(tmp_path, tiny_qa_jsonl):
    pair = [_llama(tmp_path / name, seed, 2, tiny_qa_jsonl, tied=True) for name, seed in (("a", 1), ("b", 2))]
    merged = _merge(tmp_path, "regmean_plus_plus", [str(e) for e in pair])
    own = _weights(pair[0])
    assert (
        merged.keys() == own.keys() and "lm_head.weight" not in own
    )  # as SmolLM2: the head is the embedding
    assert not torch.allclose(merged[Q_PROJ.format(1)], own[Q_PROJ.format(1)])
    single = _merge(tmp_path, "regmean_plus_plus", [str(pair[0])], name="single")
    for tensor in own:
        torch.testing.assert_close(single[tensor], own[tensor], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory, tiny_llama, tiny_qa_jsonl) -> list[Path]:
    """Two LoRA adapters on tiny_llama (q, v, down_proj), each with a manifest naming its data."""
    root = tmp_path_factory.mktemp("regmean-pp-lora")
    adapters = [make_adapter(tiny_llama, root / f"lora-{seed}", seed=seed) for seed in (1, 2)]
    return [_manifest(a, tiny_qa_jsonl, base=str(tiny_llama)) for a in adapters]


@pytest.mark.parametrize("output", ["full", "lora"])
def test_cli_merges_lora_experts_from_yaml_in_both_spaces(tmp_path, tiny_llama, lora_experts, output):
    import yaml

    from medmerge.cli import main

    config = {
        "method": "regmean_plus_plus",
        "base_model": str(tiny_llama),
        "models": [str(a) for a in lora_experts],
        "parameters": {"alpha": 0.95, "examples": 5, "batch_size": 2},
        "output": output,
        **({"rank": 16} if output == "lora" else {}),
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert manifest["config"]["method"] == "regmean_plus_plus"
    merged = load_model(tmp_path / "out")  # an adapter loads on its base
    base = _weights(tiny_llama)
    state = {k: v.float() for k, v in merged.state_dict().items()}
    untouched = "model.layers.1.self_attn.k_proj.weight"  # no adapter changes it: θ_base exactly
    torch.testing.assert_close(
        state[untouched], base[untouched], rtol=0, atol=1e-6 if output == "lora" else 0
    )
    changed = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(state[changed], base[changed])


def test_experts_without_data_or_of_another_shape_are_refused_in_one_line(
    tmp_path, llama_experts, t5_experts
):
    config = MergeConfig(method="regmean_plus_plus", models=[str(e) for e in llama_experts])
    with pytest.raises(MedmergeError, match=rf"^{llama_experts[0]}: regmean_plus_plus .* manifest") as error:
        merge_models(config, tmp_path / "out", progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
    t5 = _manifest(Path(shutil.copytree(t5_experts[0], tmp_path / "t5")), tmp_path / "qa.jsonl")
    reason = input_shortfall(METHODS["regmean_plus_plus"], [t5])
    assert (
        reason == f"{t5}: regmean_plus_plus supports {regmean_pp.SUPPORTED}; this is an encoder-decoder model"
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(MedmergeError, match=r"^gpt: regmean_plus_plus supports .*; this is a gpt2 model$"):
        regmean_pp.decoder_stack(gpt2, Path("gpt"))


def test_the_spec_says_it_reads_training_data_and_searches_regmeans_space():
    spec, regmean = METHODS["regmean_plus_plus"], METHODS["regmean"]
    assert spec.needs_data and not spec.needs_statistics and not spec.needs_factors
    assert [name for name, s in METHODS.items() if s.needs_data] == ["regmean_plus_plus"]
    assert spec.driver == "per_tensor" and spec.merge is regmean.merge and spec.base == "unused"
    assert knob_names(spec.space, 3) == knob_names(regmean.space, 3) == ["w0", "w1", "w2", "alpha"]
    params = spec.params.model_validate(spec.default)
    assert (params.alpha, params.examples, params.batch_size) == (0.9, 64, 8)
    for bad in ({"examples": 0}, {"batch_size": 0}, {"alpha": 1.5}, {"gram": 1}):
        with pytest.raises(ValueError, match=f"parameters of regmean_plus_plus.*{next(iter(bad))}"):
            MergeConfig(method="regmean_plus_plus", models=["a"], parameters=bad)
    with pytest.raises(ValueError, match="needs_data"):
        MethodSpec(
            "broken",
            "data and statistics",
            spec.params,
            merge=spec.merge,
            data=spec.data,
            needs_statistics=frozenset({"gram"}),
        )
