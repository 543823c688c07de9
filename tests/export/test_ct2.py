"""CTranslate2 export: agreement on tiny Llama and T5, the tied-T5 trap, corrupted weights, manifest."""

from __future__ import annotations

import json

import pytest
import torch
from ctranslate2.converters import TransformersConverter

from medmerge.errors import MedmergeError
from medmerge.export import ct2 as ct2_module
from medmerge.export.common import EXPORT_MANIFEST
from medmerge.export.exporter import export_model
from medmerge.manifest import checksum


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("quant", ["float32", "int8_float32"])
def test_llama_export_passes_agreement_and_writes_manifest(sharp_llama, tmp_path, quant):
    out = tmp_path / "ct2"
    manifest = export_model(str(sharp_llama), "ct2", out, quantization=quant, threads=1)
    assert {"model.bin", "vocabulary.json", "config.json", "tokenizer.json", "source_config.json"} <= {
        p.name for p in out.iterdir()
    }
    on_disk = json.loads((out / EXPORT_MANIFEST).read_text())
    assert on_disk["format"] == "ct2" and on_disk["quantization"] == quant
    assert on_disk["inputs"]["checksum"] == checksum(sharp_llama)
    a = on_disk["agreement"]["ct2"]
    assert a["passed"] and a["tokens"] == 4 * 16
    if quant == "float32":
        assert a["token_match"] == 1.0 and a["mean_abs_logprob_diff"] < 1e-4
    sizes = on_disk["sizes"]
    assert sizes["files"]["model.bin"] == (out / "model.bin").stat().st_size
    # int8 weights: about a quarter of the float32 bytes (embeddings/norms stay float32 on CPU)
    assert (
        sizes["weights_ratio"] == pytest.approx(1.0, abs=0.05)
        if quant == "float32"
        else sizes["weights_ratio"] < 0.5
    )
    assert on_disk["conversion"] == {"tie_word_embeddings": False, "tie_flag_restored": False}
    assert manifest["agreement"] == on_disk["agreement"]


def test_untied_t5_export_agrees(tiny_t5, tmp_path):
    manifest = export_model(str(tiny_t5), "ct2", tmp_path / "t5", quantization="float32", threads=1)
    assert manifest["model_kind"] == "seq2seq"
    assert manifest["conversion"]["tie_word_embeddings"] is False
    a = manifest["agreement"]["ct2"]
    assert a["token_match"] == 1.0 and a["mean_abs_logprob_diff"] < 1e-4


def _force_tied_config(monkeypatch):
    """What transformers 5.x does to T5 configs: tie_word_embeddings=True whatever config.json says."""
    original = TransformersConverter.load_model

    def load_model(self, model_class, path, **kwargs):
        model = original(self, model_class, path, **kwargs)
        model.config.tie_word_embeddings = True
        return model

    monkeypatch.setattr(TransformersConverter, "load_model", load_model)


def test_t5_tie_trap_is_repaired_by_the_guard(tiny_t5, tmp_path, monkeypatch):
    _force_tied_config(monkeypatch)
    manifest = export_model(str(tiny_t5), "ct2", tmp_path / "t5", quantization="float32", threads=1)
    assert manifest["conversion"] == {"tie_word_embeddings": False, "tie_flag_restored": True}
    assert manifest["agreement"]["ct2"]["mean_abs_logprob_diff"] < 1e-4


def test_t5_tie_trap_without_guard_fails_the_agreement_check(tiny_t5, tmp_path, monkeypatch):
    _force_tied_config(monkeypatch)
    monkeypatch.setattr(ct2_module, "guard_tied_embeddings", lambda model, folder: {})
    out = tmp_path / "t5"
    with pytest.raises(MedmergeError, match="diverges from the PyTorch model") as err:
        export_model(str(tiny_t5), "ct2", out, quantization="float32", threads=1)
    assert "\n" not in str(err.value)
    assert not out.exists() and not _leftovers(tmp_path, "t5")


def test_guard_refuses_weights_tied_away(tiny_t5):
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.shared.weight  # the file's separate lm_head is lost
    with pytest.raises(MedmergeError, match="declares untied embeddings"):
        ct2_module.guard_tied_embeddings(model, tiny_t5)


def test_corrupted_weight_is_caught(sharp_llama, tmp_path, monkeypatch):
    original = TransformersConverter.load_model

    def load_model(self, model_class, path, **kwargs):
        model = original(self, model_class, path, **kwargs)
        with torch.no_grad():  # one corrupted matrix, as a bad shard or a converter bug would give
            model.model.layers[1].self_attn.o_proj.weight.normal_(
                0, 1.0, generator=torch.Generator().manual_seed(0)
            )
        return model

    monkeypatch.setattr(TransformersConverter, "load_model", load_model)
    out = tmp_path / "broken"
    with pytest.raises(MedmergeError, match="diverges"):
        export_model(str(sharp_llama), "ct2", out, quantization="int8", threads=1)
    assert not out.exists() and not _leftovers(tmp_path, "broken")


def test_bad_requests_are_one_line_errors(sharp_llama, tmp_path):
    with pytest.raises(MedmergeError, match="choices: float32, int8, int8_float32"):
        export_model(str(sharp_llama), "ct2", tmp_path / "x", quantization="int4")
    with pytest.raises(MedmergeError, match="choices: ct2, gguf"):
        export_model(str(sharp_llama), "onnx", tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MedmergeError, match="already exists.*--overwrite"):
        export_model(str(sharp_llama), "ct2", tmp_path / "exists", quantization="float32")


def test_lora_adapter_is_merged_then_exported(sharp_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sharp_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero B, so the adapter changes the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    manifest = export_model(str(adapter), "ct2", tmp_path / "out", quantization="float32", threads=1)
    assert manifest["agreement"]["ct2"]["mean_abs_logprob_diff"] < 1e-4
    assert manifest["inputs"]["model"] == str(adapter)

    from medmerge.export.engines import open_engine, prompt_ids

    merged, plain = open_engine(tmp_path / "out", threads=1), open_engine(sharp_llama, threads=1)
    prompt = prompt_ids(plain, "What is gout?")
    assert merged.score(prompt, [5, 6, 7]) != pytest.approx(plain.score(prompt, [5, 6, 7]), abs=1e-3)
