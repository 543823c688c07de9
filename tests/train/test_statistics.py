"""Site statistics (`medmerge stats`): Gram matrices and diagonal Fisher checked against hand computations,
the file format's reader, atomic writes, and the CLI (which must not leak question text)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medmerge import site_stats
from medmerge.cli import main
from medmerge.data import encode_pair
from medmerge.errors import MedmergeError
from medmerge.models import load_model, load_tokenizer
from medmerge.site_stats import SiteStatistics, write_statistics
from medmerge.train import train_expert
from medmerge.train.statistics import (
    base_weight_names,
    collect_fishers,
    collect_grams,
    collect_statistics,
    compute_statistics,
    statistic_linears,
)
from tests.train.helpers import tiny_config

CANARY = "ZEBRACANARY"
QUESTIONS = [
    "What is diabetes ?",
    "What are the symptoms of asthma and how is it treated in children ?",
    "How to prevent influenza ?",
    "Is hypertension inherited ?",
    "What causes anemia ?",
]


def _linear_weight_names(folder: Path) -> set[str]:
    """Independently: the 2-D tensors of the model file other than the embeddings."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {
            k
            for k in f.keys()
            if len(f.get_slice(k).get_shape()) == 2
            and "embed" not in k
            and "relative_attention_bias" not in k
            and k != "shared.weight"
        }


def _examples(folder: Path, kind: str) -> list[dict[str, list[int]]]:
    tokenizer = load_tokenizer(folder)
    return [
        encode_pair(q, f"answer {i} " * (i + 1), tokenizer, kind, 64, 32) for i, q in enumerate(QUESTIONS)
    ]


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    return x.T @ x


@pytest.fixture(scope="module")
def canary_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("canary") / "site.jsonl"
    topics = ["diabetes", "asthma", "influenza", "anemia", "gout"]
    with open(path, "w") as f:
        for i in range(40):
            topic = topics[i % len(topics)]
            row = {"question": f"What is {topic} ? {CANARY} {i}", "answer": f"{topic} is a disease. {CANARY}"}
            f.write(json.dumps(row) + "\n")
    return path


def _train(model: Path, data: Path, out: Path, **overrides) -> Path:
    config = tiny_config(model, data, max_steps=3, eval_every=0, eval_examples=4, **overrides)
    return train_expert(config, out, progress=False)


@pytest.fixture(scope="module")
def lora_expert(tiny_llama, canary_jsonl, tmp_path_factory) -> Path:
    return _train(tiny_llama, canary_jsonl, tmp_path_factory.mktemp("experts") / "lora")


# ------------------------------------------------------------------------------------------ Gram


def test_gram_of_a_causal_model_equals_xtx_of_its_inputs(tiny_llama) -> None:
    model = load_model(tiny_llama).eval()
    modules = statistic_linears(model, base_weight_names(tiny_llama))
    assert set(modules) == _linear_weight_names(tiny_llama)  # every Linear, keyed by the file's names
    examples = _examples(tiny_llama, "causal")
    grams = collect_grams(model, modules, examples, pad_id=0, batch_size=3)

    q0, q1, head = [], [], []
    with torch.no_grad():
        for e in examples:  # one at a time: no padding at all
            ids = torch.tensor([e["input_ids"]])
            hidden = model(ids, output_hidden_states=True).hidden_states
            q0.append(model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)))
            q1.append(model.model.layers[1].input_layernorm(hidden[1]))
            head.append(hidden[-1])  # after the final norm: the head's input
    layer0, layer1 = "model.layers.0.self_attn.", "model.layers.1.self_attn."
    torch.testing.assert_close(grams.sums[layer0 + "q_proj.weight"], _gram(q0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams.sums[layer1 + "q_proj.weight"], _gram(q1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams.sums["lm_head.weight"], _gram(head), rtol=1e-5, atol=1e-5)
    assert grams.tokens == {"input": sum(len(e["input_ids"]) for e in examples)}
    # q, k, v read one tensor, and gate, up another: stored once, aliased
    assert (
        grams.aliases[layer0 + "k_proj.weight"]
        == grams.aliases[layer0 + "v_proj.weight"]
        == layer0 + "q_proj.weight"
    )
    assert grams.aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert set(grams.sums) | set(grams.aliases) == set(modules) and not set(grams.sums) & set(grams.aliases)
    # padding rows never count: batch size 1 gives the same sums
    single = collect_grams(model, modules, examples, pad_id=0, batch_size=1)
    for name, total in grams.sums.items():
        torch.testing.assert_close(single.sums[name], total, rtol=2e-5, atol=1e-5)


def test_gram_of_a_seq2seq_model_uses_encoder_and_decoder_tokens(tiny_t5) -> None:
    model = load_model(tiny_t5).eval()
    modules = statistic_linears(model, base_weight_names(tiny_t5))
    assert set(modules) == _linear_weight_names(tiny_t5)
    examples = _examples(tiny_t5, "seq2seq")
    tokenizer = load_tokenizer(tiny_t5)
    grams = collect_grams(model, modules, examples, pad_id=tokenizer.pad_token_id, batch_size=2)

    enc_q, cross_k, dec_q = [], [], []
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            out = model(input_ids=ids, labels=labels, output_hidden_states=True)
            enc_q.append(model.encoder.block[0].layer[0].layer_norm(model.shared(ids)))
            cross_k.append(out.encoder_last_hidden_state)
            dec_inputs = model._shift_right(labels)
            dec_q.append(model.decoder.block[0].layer[0].layer_norm(model.shared(dec_inputs)))
    torch.testing.assert_close(
        grams.sums["encoder.block.0.layer.0.SelfAttention.q.weight"], _gram(enc_q), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        grams.sums["decoder.block.0.layer.0.SelfAttention.q.weight"], _gram(dec_q), rtol=1e-5, atol=1e-5
    )
    stored = "decoder.block.0.layer.1.EncDecAttention.k.weight"
    torch.testing.assert_close(grams.sums[stored], _gram(cross_k), rtol=1e-5, atol=1e-5)
    for block in (0, 1):  # every cross-attention k/v reads the one encoder output
        for proj in "kv":
            name = f"decoder.block.{block}.layer.1.EncDecAttention.{proj}.weight"
            assert name == stored or grams.aliases[name] == stored
    assert grams.tokens == {
        "encoder": sum(len(e["input_ids"]) for e in examples),
        "decoder": sum(len(e["labels"]) for e in examples),
    }


# ---------------------------------------------------------------------------------------- Fisher


def _manual_fisher(model, examples, weight: torch.nn.Parameter) -> torch.Tensor:
    """mean_i (∂ Σ answer log p / ∂W)², from plain full logits and autograd, one example at a time."""
    total = torch.zeros_like(weight)
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        (g,) = torch.autograd.grad(-nll, weight)
        total += g**2
    return total / len(examples)


def test_fisher_of_a_full_model_equals_per_example_autograd(tiny_llama) -> None:
    model = load_model(tiny_llama)
    modules = statistic_linears(model, base_weight_names(tiny_llama))
    examples = _examples(tiny_llama, "causal")[:3]
    flags = [p.requires_grad for p in model.parameters()]
    fishers = collect_fishers(model, modules, examples, pad_id=0)
    assert set(fishers) == set(modules)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ):
        weight = modules[name].weight
        weight.requires_grad_(True)
        expected = _manual_fisher(model, examples, weight)
        assert fishers[name].shape == weight.shape
        torch.testing.assert_close(fishers[name], expected, rtol=1e-4, atol=1e-10)


def test_fisher_of_a_lora_expert_is_taken_on_the_full_weight(tiny_llama, lora_expert) -> None:
    """W = W₀ + (alpha/r)·B·A built by hand from the adapter file, put in a fresh base copy."""
    model = load_model(lora_expert)  # the expert, adapter merged
    modules = statistic_linears(model, base_weight_names(lora_expert))
    assert set(modules) == _linear_weight_names(tiny_llama)
    examples = _examples(tiny_llama, "causal")[:2]
    fishers = collect_fishers(model, modules, examples, pad_id=0)

    config = json.loads((lora_expert / "adapter_config.json").read_text())
    adapter = load_file(str(lora_expert / "adapter_model.safetensors"))
    manual = load_model(tiny_llama)
    weights = dict(manual.named_parameters())
    with torch.no_grad():
        for key, a in adapter.items():
            if key.endswith(".lora_A.weight"):
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = adapter[f"base_model.model.{path}.lora_B.weight"]
                weights[f"{path}.weight"] += config["lora_alpha"] / config["r"] * b @ a
    assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].abs().max() > 0  # trained
    layer = manual.model.layers[1].mlp.down_proj
    expected = _manual_fisher(manual, examples, layer.weight)
    torch.testing.assert_close(
        fishers["model.layers.1.mlp.down_proj.weight"], expected, rtol=1e-4, atol=1e-10
    )


# ------------------------------------------------- fused passes against a straightforward reference


def _reference_statistics(model, modules, examples, n_gram: int, n_fisher: int):
    """Today's definitions computed the plain way: each example alone (no padding), the Gram from
    float64 pre-hooks, the Fisher from autograd on the weights with one backward pass per example."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    seq2seq = bool(model.config.is_encoder_decoder)
    with torch.no_grad():
        for e in examples[:n_gram]:
            ids = torch.tensor([e["input_ids"]])
            extra = {"labels": torch.tensor([e["labels"]])} if seq2seq else {}
            model(input_ids=ids, **extra)
    for h in handles:
        h.remove()
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    fishers = [torch.zeros_like(w) for w in weights]
    for e in examples[:n_fisher]:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        if seq2seq:
            logits, target = model(input_ids=ids, labels=labels).logits[0], labels[0]
        else:
            logits, target = model(input_ids=ids).logits[0, :-1], labels[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        for total, g in zip(fishers, torch.autograd.grad(nll, weights), strict=True):
            total += g**2
    for w, flag in zip(weights, flags, strict=True):
        w.requires_grad_(flag)
    return sums, {n: f / max(n_fisher, 1) for n, f in zip(modules, fishers, strict=True)}


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("batch_size", [2, 3])
def test_fused_fisher_and_gram_passes_equal_the_reference(tiny_llama, tiny_t5, kind, batch_size) -> None:
    folder = tiny_llama if kind == "causal" else tiny_t5
    model = load_model(folder).eval()
    modules = statistic_linears(model, base_weight_names(folder))
    examples = _examples(folder, kind)
    pad_id = load_tokenizer(folder).pad_token_id
    grams, fishers = collect_statistics(model, modules, examples, 5, 3, pad_id, batch_size)
    ref_grams, ref_fishers = _reference_statistics(model, modules, examples, 5, 3)
    for name in modules:
        stored = grams.aliases.get(name, name)
        torch.testing.assert_close(grams.sums[stored], ref_grams[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fishers[name], ref_fishers[name], rtol=1e-4, atol=1e-10)
    # the Fisher's examples come first: a Gram over fewer examples than the Fisher is not fused
    grams_only, _ = collect_statistics(model, modules, examples, 2, 3, pad_id, batch_size)
    ref_two, _ = _reference_statistics(model, modules, examples, 2, 0)
    for name, total in grams_only.sums.items():
        torch.testing.assert_close(total, ref_two[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- experts, end to end


def _check_folder(folder: Path, base: Path, kinds: list[str], expert: Path | None = None) -> dict:
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in _linear_weight_names(base)}
    with SiteStatistics.open(folder) as stats:
        for kind in ("gram", "fisher"):
            assert stats.has(kind) == (kind in kinds)
            assert stats.names(kind) == (sorted(shapes) if kind in kinds else [])
        for name, (rows, cols) in shapes.items():  # Gram (in, in); Fisher: the weight's shape
            if "gram" in kinds:
                assert stats.read("gram", name).shape == (cols, cols)
            if "fisher" in kinds:
                assert stats.read("fisher", name).shape == (rows, cols)
        assert stats.matches_model(expert) and not stats.matches_model(base)
        return stats.info


def test_lora_full_and_seq2seq_experts(tiny_llama, tiny_t5, lora_expert, canary_jsonl, tmp_path) -> None:
    spec = [f"jsonl:{canary_jsonl}"]
    out = compute_statistics(
        lora_expert,
        spec,
        max_examples=6,
        fisher_examples=2,
        batch_size=4,
        out_dir=tmp_path / "lora",
        progress=False,
    )
    info = _check_folder(out, tiny_llama, ["gram", "fisher"], lora_expert)
    assert info["examples"] == 6 and info["per_kind"]["fisher"]["examples"] == 2
    assert info["model"]["adapter"] and info["model"]["base_model"] == str(tiny_llama.resolve())

    full = _train(tiny_llama, canary_jsonl, tmp_path / "full-expert", method="full")
    compute_statistics(full, kinds=["fisher"], max_examples=3, progress=False)  # SPECs from its manifest
    info = _check_folder(full, tiny_llama, ["fisher"])
    assert info["examples"] == 3 and info["model"]["adapter"] is False

    t5 = _train(tiny_t5, canary_jsonl, tmp_path / "t5-expert")
    compute_statistics(t5, spec, kinds=["gram"], max_examples=5, batch_size=2, progress=False)
    info = _check_folder(t5, tiny_t5, ["gram"])
    assert set(info["per_kind"]["gram"]["tokens"]) == {"encoder", "decoder"}


def test_other_data_than_the_expert_trained_on_is_refused(lora_expert, tiny_qa_jsonl, tmp_path) -> None:
    with pytest.raises(MedmergeError, match="fingerprints differ"):
        compute_statistics(lora_expert, [f"jsonl:{tiny_qa_jsonl}"], out_dir=tmp_path / "o", progress=False)
    with pytest.raises(MedmergeError, match="kinds"):
        compute_statistics(lora_expert, kinds=["hessian"], out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- format and reader


def _random_statistics() -> tuple[dict, dict, dict]:
    torch.manual_seed(0)
    grams = {"a.q.weight": torch.randn(4, 4, dtype=torch.float64), "a.o.weight": torch.randn(3, 3)}
    fishers = {"a.q.weight": torch.rand(2, 4), "a.k.weight": torch.rand(5, 4)}
    return grams, fishers, {"a.k.weight": "a.q.weight"}


def test_reader_round_trips_and_resolves_aliases(tmp_path) -> None:
    grams, fishers, aliases = _random_statistics()
    write_statistics(tmp_path, grams, fishers, {"examples": 3, "tokens": 10}, aliases=aliases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["statistics.json", "statistics.safetensors"]
    with SiteStatistics.open(tmp_path) as stats:
        assert stats.info["format"] == "medmerge-statistics/1" and stats.info["examples"] == 3
        assert stats.info["kinds"] == ["gram", "fisher"] and stats.info["dtype"] == "float32"
        assert stats.info["bytes"] == (tmp_path / "statistics.safetensors").stat().st_size
        assert stats.names("gram") == ["a.k.weight", "a.o.weight", "a.q.weight"]
        assert stats.names("fisher") == ["a.k.weight", "a.q.weight"]
        torch.testing.assert_close(stats.read("gram", "a.q.weight"), grams["a.q.weight"].float())
        torch.testing.assert_close(stats.read("gram", "a.k.weight"), grams["a.q.weight"].float())  # alias
        torch.testing.assert_close(stats.read("fisher", "a.k.weight"), fishers["a.k.weight"])
        assert stats.read("fisher", "a.o.weight") is None and stats.read("gram", "nope.weight") is None
        assert stats.read("gram", "a.o.weight").dtype == torch.float32
        with pytest.raises(MedmergeError, match="unknown"):
            stats.read("hessian", "a.q.weight")
    with safe_open(str(tmp_path / "statistics.safetensors"), framework="pt") as f:  # plain keys on disk
        assert sorted(f.keys()) == [
            "fisher::a.k.weight",
            "fisher::a.q.weight",
            "gram::a.o.weight",
            "gram::a.q.weight",
        ]


def test_unknown_and_corrupt_files_are_one_line_errors(tmp_path) -> None:
    def fails(match: str) -> None:
        with pytest.raises(MedmergeError, match=match) as err:
            SiteStatistics.open(tmp_path)
        assert "\n" not in str(err.value)

    fails("statistics.json: not found")
    grams, fishers, aliases = _random_statistics()
    write_statistics(tmp_path, grams, fishers, {}, aliases=aliases)
    info_path, tensors = tmp_path / "statistics.json", tmp_path / "statistics.safetensors"
    record = json.loads(info_path.read_text())
    body = tensors.read_bytes()
    tensors.write_bytes(body[:-8])
    fails("statistics.safetensors: .* bytes, but statistics.json records")
    tensors.write_bytes(b"\xff" * len(body))
    fails("statistics.safetensors: corrupt")
    info_path.write_text("{not json")
    fails("statistics.json: unreadable")
    info_path.write_text(json.dumps({**record, "format": "other/9"}))
    fails("statistics.json: format 'other/9'")
    from safetensors.torch import save_file

    save_file({"hessian::w": torch.ones(2)}, str(tensors))
    info_path.write_text(json.dumps({**record, "bytes": tensors.stat().st_size}))
    fails("unknown tensor 'hessian::w'")


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    grams, fishers, aliases = _random_statistics()
    write_statistics(tmp_path, grams, fishers, {"examples": 1}, aliases=aliases)
    before = (tmp_path / "statistics.json").read_text()

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_statistics(tmp_path, {"x.weight": torch.ones(2, 2)}, {}, {"examples": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["statistics.json", "statistics.safetensors"]
    assert (tmp_path / "statistics.json").read_text() == before  # the old pair, whole and readable
    with SiteStatistics.open(tmp_path) as stats:
        assert stats.info["examples"] == 1
    monkeypatch.undo()

    def crash_at_commit(src, dst):  # the tensors are in place, the record is not: no statistics at all
        if str(dst).endswith("statistics.json"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(site_stats.os, "replace", crash_at_commit)
    with pytest.raises(KeyboardInterrupt):
        write_statistics(tmp_path, {"x.weight": torch.ones(2, 2)}, {}, {"examples": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["statistics.safetensors"]
    with pytest.raises(MedmergeError, match="not found"):
        SiteStatistics.open(tmp_path)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_statistics_without_question_text(lora_expert, canary_jsonl, tmp_path, capsys) -> None:
    out = tmp_path / "shared"
    argv = ["stats", str(lora_expert), "--data", f"jsonl:{canary_jsonl}", "--max-examples", "4"]
    argv += ["--out", str(out), "--threads", "1", "--quiet"]
    assert main(argv) == 0
    assert "statistics.safetensors" in capsys.readouterr().out
    text = (out / "statistics.json").read_text()
    info = json.loads(text)
    assert info["kinds"] == ["gram", "fisher"] and info["examples"] == 4
    assert info["data"]["split"] == "train" and info["data"]["sources"][0]["train_fingerprint"]
    assert CANARY not in text and CANARY.lower() not in text.lower()
    with open(out / "statistics.safetensors", "rb") as f:  # nor in the tensor file's header
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert CANARY.encode() not in header
    assert main(argv) == 2  # statistics exist: refused without --overwrite
    assert "already holds statistics" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--kinds", "gram"]) == 0
    assert json.loads((out / "statistics.json").read_text())["kinds"] == ["gram"]
