"""GGUF export: RoPE row permutation, metadata llama.cpp reads, agreement, tied embeddings, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from medmerge.errors import MedmergeError
from medmerge.export import gguf as gguf_module
from medmerge.export.exporter import export_model


def test_permute_rope_is_inverted_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    q = rng.standard_normal((4 * 8, 32)).astype(np.float32)  # 4 heads of 8
    k = rng.standard_normal((2 * 8, 32)).astype(np.float32)  # 2 kv heads
    reader = LlamaTensorProcessor()
    assert np.array_equal(reader._reverse_permute_weights(gguf_module.permute_rope(q, 4), 4, 4), q)
    assert np.array_equal(reader._reverse_permute_weights(gguf_module.permute_rope(k, 2), 4, 2), k)
    # within one head, rows (0..d/2-1 | d/2..d-1) become interleaved pairs (0, d/2), (1, d/2+1), ...
    head = gguf_module.permute_rope(np.arange(8, dtype=np.float32)[:, None], 1)[:, 0]
    assert head.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.fixture(scope="module")
def q8_export(sharp_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "q8"
    return out, export_model(str(sharp_llama), "gguf", out, quantization="q8_0", threads=1)


def test_q8_0_export_agrees_and_carries_llama_cpp_metadata(q8_export, sharp_llama):
    import gguf
    from transformers import AutoTokenizer

    out, manifest = q8_export
    a = manifest["agreement"]["torch-gguf"]
    assert a["passed"] and a["token_match"] >= 0.9 and a["mean_abs_logprob_diff"] < 0.05
    assert "dequantized by transformers" in manifest["gguf_check"]
    from medmerge.export.common import llama_cpp_available

    if llama_cpp_available():  # the optional llama.cpp runtime checks the file too
        assert manifest["agreement"]["llama.cpp"]["passed"]
    reader = gguf.GGUFReader(str(out / manifest["gguf_file"]))
    tokenizer = AutoTokenizer.from_pretrained(sharp_llama)
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert len(reader.get_field("tokenizer.ggml.tokens").data) == len(tokenizer)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tokenizer.eos_token_id
    assert reader.get_field("tokenizer.chat_template").contents() == tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # untied model: its own output matrix
    assert manifest["sizes"]["weights_ratio"] < 0.4


def test_tied_model_writes_embeddings_once(tied_llama, tmp_path):
    import gguf

    manifest = export_model(str(tied_llama), "gguf", tmp_path / "f16", quantization="f16", threads=1)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "f16" / manifest["gguf_file"])).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert manifest["conversion"]["tie_word_embeddings"] is True
    assert manifest["agreement"]["torch-gguf"]["mean_abs_logprob_diff"] < 0.01


def test_missing_rope_permutation_is_caught(sharp_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_module, "permute_rope", lambda weight, n_heads: weight)  # a classic bug
    with pytest.raises(MedmergeError, match="diverges"):
        export_model(str(sharp_llama), "gguf", tmp_path / "bad", quantization="f32", threads=1)
    assert not (tmp_path / "bad").exists()


def test_unsupported_requests_say_why(tiny_t5, sharp_llama, tmp_path):
    with pytest.raises(MedmergeError, match="Llama-architecture.*use --format ct2"):
        export_model(str(tiny_t5), "gguf", tmp_path / "t5", quantization="f16")
    with pytest.raises(MedmergeError, match="unavailable.*Q4_K.*choices: f32, f16, q8_0, q4_0"):
        export_model(str(sharp_llama), "gguf", tmp_path / "k", quantization="q4_k")
    assert not (tmp_path / "t5").exists() and not (tmp_path / "k").exists()


def test_gguf_export_answers_through_the_engine_choice(q8_export, sharp_llama):
    from medmerge.export.common import llama_cpp_available
    from medmerge.export.engines import available_engines, open_engine, prompt_ids

    out, _ = q8_export
    expected = ["llama.cpp", "torch"] if llama_cpp_available() else ["torch"]
    assert available_engines(out) == expected
    engine = open_engine(out, "torch", threads=1)
    assert engine.name == "torch-gguf"
    reference = open_engine(sharp_llama, threads=1)
    prompt = prompt_ids(reference, "What is gout?")
    assert prompt_ids(engine, "What is gout?") == prompt
    # q8_0 weights: the same greedy answer as the float32 model on this prompt
    assert list(engine.stream_ids(prompt, 8)) == list(reference.stream_ids(prompt, 8))
