"""llama.cpp's own tokenization of medmerge's GGUF vs transformers', token for token, on real questions.

What llama.cpp, Ollama and LM Studio do with a GGUF: read the chat template and the vocabulary (with its
`tokenizer.ggml.pre` pre-tokenizer) embedded in the file, render the conversation, tokenize it. For each
model this writes the GGUF (f16) with `medmerge.export.gguf.write_gguf`, opens it with llama-cpp-python
(`Llama(path, vocab_only=True)`), renders each question with the GGUF's template (Jinja, as
llama-cpp-python's chat formatter does), tokenizes it (`tokenize(add_bos=True, special=True)`) and
compares with transformers (`apply_chat_template(..., add_generation_prompt=True)` on the folder's
tokenizer, which is what medmerge's engines feed the model). Questions: the first N/3 of MedQuAD,
GenMedGPT-5k and PubMedQA each.

    # llama-cpp-python builds from source; CPU only:
    CMAKE_ARGS="-DGGML_BLAS=OFF -DLLAMA_CURL=OFF" python3 -m venv /tmp/llamavenv && \\
        /tmp/llamavenv/bin/pip install llama-cpp-python==0.3.36
    PYTHONPATH=$(echo /tmp/llamavenv/lib/python3*/site-packages) .venv/bin/python \\
        bench/gguf_tokenization.py [--n 1000] [MODEL ...]   (default: smollm2-135m)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from medmerge.data import load_dataset
from medmerge.export.gguf import write_gguf
from medmerge.models import load_tokenizer, resolve_model


def questions(n: int) -> list[str]:
    per = -(-n // 3)
    out = [
        p.question for name in ("medquad", "genmedgpt", "pubmedqa") for p in load_dataset(name).pairs[:per]
    ]
    return out[:n]


def compare(model: str, texts: list[str], folder: Path) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = resolve_model(model)
    path = folder / f"{Path(model).name}.gguf"
    write_gguf(source, path, "f16", exported_as=model)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    meta = llm.metadata
    eos = llm._model.token_get_text(llm.token_eos())
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=eos, bos_token="")
    tokenizer = load_tokenizer(source)
    same_text = same_ids = 0
    first = None
    for q in texts:
        messages = [{"role": "user", "content": q}]
        hf_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        hf_ids = tokenizer(hf_text, add_special_tokens=False)["input_ids"]
        gguf_text = formatter(messages=messages).prompt
        ids = llm.tokenize(gguf_text.encode(), add_bos=True, special=True)
        same_text += gguf_text == hf_text
        same_ids += ids == hf_ids
        if ids != hf_ids and first is None:
            k = next((i for i, (a, b) in enumerate(zip(ids, hf_ids, strict=False)) if a != b), None)
            first = {"question": q[:80], "at": k, "llama.cpp": ids[:12], "transformers": hf_ids[:12]}
    return {
        "model": model,
        "pre": meta.get("tokenizer.ggml.pre"),
        "n": len(texts),
        "same_prompt_text": same_text,
        "same_token_ids": same_ids,
        "first_mismatch": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    texts = questions(args.n)
    with tempfile.TemporaryDirectory(prefix="gguf-tok-") as tmp:
        for model in args.models:
            r = compare(model, texts, Path(tmp))
            print(
                f"{r['model']}: pre-tokenizer {r['pre']!r}; {r['same_token_ids']}/{r['n']} prompts tokenized "
                f"identically by llama.cpp and transformers; {r['same_prompt_text']}/{r['n']} identical "
                f"prompt texts from the GGUF's template"
            )
            if r["first_mismatch"]:
                print(f"  first mismatch: {r['first_mismatch']}")


if __name__ == "__main__":
    main()
