"""GGUF metadata that llama.cpp, Ollama and LM Studio read: the pre-tokenizer follows the tokenizer,
`general.*` names the model, its base and licence, and an Ollama Modelfile lies beside the GGUF."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medmerge.errors import MedmergeError
from medmerge.export import gguf as gguf_module
from medmerge.export.exporter import export_model
from medmerge.model_card import Lineage


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_pre_tokenizer_is_found_by_llama_cpp_hash_then_by_structure(
    sharp_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = _tokenizer(sharp_llama)
    # the tiny tokenizer's hash is in no table; its plain byte-level split is GPT-2's
    assert gguf_module.pre_tokenizer_name(sharp_llama, tokenizer) == "gpt-2"
    ids = tokenizer.encode(gguf_module.PRE_TOKENIZER_CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    monkeypatch.setitem(gguf_module.PRE_TOKENIZER_HASHES, digest, "smollm")
    assert gguf_module.pre_tokenizer_name(sharp_llama, tokenizer) == "smollm"  # the hash decides first
    monkeypatch.delitem(gguf_module.PRE_TOKENIZER_HASHES, digest)

    odd = tmp_path / "odd"
    odd.mkdir()
    spec = json.loads((sharp_llama / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(MedmergeError, match="pre-tokenizer not recognized"):
        gguf_module.pre_tokenizer_name(odd, tokenizer)


@pytest.mark.slow
def test_embedded_smollm2_is_llama_cpp_smollm(embedded_cache: Path) -> None:
    from medmerge.models import resolve_model

    folder = resolve_model("smollm2-135m")
    assert gguf_module.pre_tokenizer_name(folder, _tokenizer(folder)) == "smollm"


def test_general_metadata_names_base_model_and_licence(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    lineage = Lineage(("HuggingFaceTB/SmolLM2-135M-Instruct",), "apache-2.0")
    gguf_module._general_metadata(writer, "ties-full", lineage, "q8_0", 134_515_008)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama" and field("general.name") == "ties-full"
    assert field("general.license") == "apache-2.0" and field("general.quantized_by") == "medmerge"
    assert field("general.size_label") == "135M" and "q8_0" in field("general.description")
    assert field("general.base_model.count") == 1
    assert field("general.base_model.0.name") == "SmolLM2-135M-Instruct"
    assert field("general.base_model.0.organization") == "HuggingFaceTB"
    assert (
        field("general.base_model.0.repo_url") == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_export_writes_metadata_and_an_ollama_modelfile(sharp_llama: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "q8"
    manifest = export_model(str(sharp_llama), "gguf", out, quantization="q8_0", threads=1)
    reader = gguf.GGUFReader(str(out / manifest["gguf_file"]))
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert reader.get_field("general.name").contents() == sharp_llama.name
    assert reader.get_field("general.quantized_by").contents() == "medmerge"
    assert reader.get_field("general.base_model.count").contents() == 0  # a bare folder names no base

    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{manifest['gguf_file']}\n" in modelfile
    assert f'TEMPLATE """{gguf_module.OLLAMA_CHATML}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|im_start|>"' in modelfile
    assert "SYSTEM" not in modelfile  # the tiny template has no default system prompt
    assert "not medical advice" in modelfile


def test_modelfile_keeps_the_templates_default_system_prompt(sharp_llama: Path, tmp_path: Path) -> None:
    tokenizer = _tokenizer(sharp_llama)
    tokenizer.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a careful assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    folder = tmp_path / "with-system"
    tokenizer.save_pretrained(folder)
    text = gguf_module.write_modelfile(tmp_path, "model-f16.gguf", folder).read_text()
    assert 'SYSTEM """You are a careful assistant"""' in text and "FROM ./model-f16.gguf" in text
