"""GGUF export of Llama-architecture causal models (llama.cpp / Ollama), written with the `gguf` package.

Tensors get llama.cpp's names (gguf's tensor-name map for MODEL_ARCH.LLAMA); q_proj / k_proj rows are
permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one:
W.reshape(h, 2, d/2, n).swapaxes(1, 2).reshape(W.shape), with h = heads (q) or kv heads (k).
Tied embeddings are written once (token_embd); llama.cpp and transformers reuse it as the output layer.
1-D tensors (norms) stay float32. Quantizations: f32, f16, q8_0 (blocks of 32, one f16 scale), q4_0
(blocks of 32 4-bit values; token_embd/output kept at q8_0, as llama.cpp keeps them at higher precision).
A 2-D tensor whose rows are not a multiple of 32 falls back to f16.

Metadata follows the model, not the folder's history: `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer) is
found as llama.cpp's convert_hf_to_gguf.py finds it, by the SHA-256 of the token ids of its check text
(`PRE_TOKENIZER_HASHES`), else from tokenizer.json's pre_tokenizer (a plain byte-level GPT-2 split:
"gpt-2"); an unknown one is an error, as there. `general.*` names the model, its base models (Hub ids) and
licence (`medmerge.model_card.lineage`), the quantization and medmerge as quantizer. `write_modelfile`
writes an Ollama Modelfile beside the GGUF: FROM, the ChatML TEMPLATE, the template's default SYSTEM
prompt and the stop tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.errors import MedmergeError

GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp's convert_hf_to_gguf.py `get_vocab_base_pre`: this text's token ids, hashed, name the
# pre-tokenizer. The hashes below are a subset of its table (same text, same hashing).
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
_K_QUANTS = ("q4_k", "q5_k", "q6_k")


def _can_quantize(qtype: Any) -> bool:
    from gguf.quants import quantize

    try:
        quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def check_gguf_quantization(quantization: str) -> None:
    """Raise unless the installed gguf package can write `quantization`; k-quants say why they are absent."""
    import gguf

    if quantization in GGUF_QUANTIZATIONS:
        return
    if quantization in _K_QUANTS and not _can_quantize(gguf.GGMLQuantizationType[quantization.upper()]):
        raise MedmergeError(
            f"--quant {quantization!r}: unavailable: the installed gguf package's Python quantizer cannot "
            f"write {quantization.upper()} (NotImplementedError); export q8_0 or f16 and requantize with "
            f"llama.cpp's llama-quantize (choices: {', '.join(GGUF_QUANTIZATIONS)})"
        )
    raise MedmergeError(
        f"--quant {quantization!r}: unknown for gguf (choices: {', '.join(GGUF_QUANTIZATIONS)})"
    )


def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (heads·d, n) from rotate-half to interleaved RoPE order."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tensor_type(name: str, array: np.ndarray, quantization: str):
    from gguf import GGMLQuantizationType as Q

    if array.ndim == 1 or quantization == "f32":
        return Q.F32
    if quantization == "f16" or array.shape[-1] % 32:
        return Q.F16
    if quantization == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        return Q.Q4_0
    return Q.Q8_0


def _tokenizer_metadata(writer: Any, source: Path, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, as llama.cpp reads them."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((source / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE":
        raise MedmergeError(
            f"{source}/tokenizer.json: GGUF export supports BPE tokenizers (found {spec['model']['type']})"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(source, tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (
            writer.add_pad_token_id,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        ),
    ):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(source: Path, tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer of `source` (module doc); MedmergeError if unknown."""
    ids = tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = json.loads((source / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex split, nothing else (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2)
    raise MedmergeError(
        f"{source}/tokenizer.json: pre-tokenizer not recognized (check hash {digest}, pre_tokenizer "
        f"{pre.get('type')!r}); llama.cpp would split text differently from transformers"
    )


def _general_metadata(writer: Any, name: str, lineage: Any, quantization: str, n_params: int) -> None:
    """`general.*`: name, base models (Hub ids), licence, quantization and who quantized, size label."""
    import gguf

    writer.add_name(name)
    writer.add_description(f"{name}, exported to GGUF ({quantization}) by medmerge")
    writer.add_quantized_by("medmerge")
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    if lineage.license:
        writer.add_license(lineage.license)
    writer.add_base_model_count(len(lineage.base_model))
    for i, hub in enumerate(lineage.base_model):
        writer.add_base_model_name(i, hub.split("/")[-1])
        if "/" in hub:
            writer.add_base_model_organization(i, hub.split("/")[0])
            writer.add_base_model_repo_url(i, f"https://huggingface.co/{hub}")
    writer.add_tags(["medmerge", "medical", "text-generation"])


OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
NOTICE = "Answers are generated by a small language model: they are not medical advice."


def write_modelfile(folder: Path, gguf_file: str, source: Path, name: str | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF (`ollama create NAME -f Modelfile`): FROM, the chat template as
    an Ollama TEMPLATE (ChatML; other templates are left to Ollama, which reads the GGUF's), the
    template's default system prompt as SYSTEM, and the end-of-turn tokens as stop parameters."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    template = tokenizer.chat_template or ""
    lines = [
        f"# Ollama Modelfile for {name or source.name}, written by medmerge. {NOTICE}",
        f"FROM ./{gguf_file}",
    ]
    stops = [t for t in dict.fromkeys([tokenizer.eos_token]) if t]
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        stops += ["<|im_start|>"] if "<|im_start|>" not in stops else []
        shown = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        head = "<|im_start|>system\n"
        if shown.startswith(head):
            lines.append(f'SYSTEM """{shown[len(head) : shown.index("<|im_end|>")]}"""')
    lines += [f'PARAMETER stop "{t}"' for t in dict.fromkeys(stops)]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_gguf(
    source: Path, out_file: Path, quantization: str, exported_as: str | None = None
) -> dict[str, Any]:
    """Write the Llama-architecture Hugging Face folder `source` as one GGUF file; `exported_as` is the
    model as the user named it (an embedded name, a Hub id or a folder: its lineage), else `source`."""
    import gguf
    from gguf.quants import quantize

    from medmerge.model_card import lineage
    from medmerge.models import load_model

    check_gguf_quantization(quantization)
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral") or config.get("is_encoder_decoder"):
        raise MedmergeError(
            f"{source}/config.json: GGUF export supports Llama-architecture causal models "
            f"(found model_type {config.get('model_type')!r}); use --format ct2"
        )
    model = load_model(source, dtype="float32")
    cfg = model.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    tied = bool(cfg.tie_word_embeddings)
    ftype = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[quantization]  # llama_ftype: ALL_F32, MOSTLY_*

    writer = gguf.GGUFWriter(str(out_file), "llama")
    given = exported_as or str(source)
    name = Path(given).name if Path(given).exists() else given
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    _general_metadata(writer, name, lineage(given), quantization, n_params)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, source, cfg.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MedmergeError(f"{source}: tensor {hf_name!r} has no llama.cpp name (unsupported layer?)")
        array = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_rope(array, n_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_rope(array, n_kv)
        qtype = _tensor_type(name, array, quantization)
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tie_word_embeddings": tied, "tensor_types": counts}
