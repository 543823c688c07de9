"""Model resolution and loading: embedded default, HF folders, refusing pickle, adapters' base."""

from __future__ import annotations

import shutil

import pytest
import torch

from medmerge.errors import MedmergeError
from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model


def test_folders_and_kinds(tiny_llama, tiny_t5):
    assert resolve_model(tiny_llama) == tiny_llama
    assert model_kind(tiny_llama) == "causal" and model_kind(tiny_t5) == "seq2seq"
    assert type(load_model(tiny_t5)).__name__ == "T5ForConditionalGeneration"


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(
        MedmergeError, match=r"not a folder and not an embedded model name \(known: smollm2-135m\)"
    ):
        resolve_model("flan-t5-small")
    with pytest.raises(MedmergeError, match="no config.json"):
        resolve_model(tmp_path)


def test_pickle_checkpoints_are_refused_unless_opted_in(tiny_llama, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    state = load_model(tiny_llama).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(MedmergeError, match="refusing pickle checkpoints"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], state["lm_head.weight"])


@pytest.mark.slow
def test_embedded_model_loads_and_generates(embedded_cache):
    path = resolve_model("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "medmerge-model.json").is_file()
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is diabetes?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "diabet" in answer.lower()
