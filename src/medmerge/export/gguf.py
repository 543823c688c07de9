"""GGUF export of Llama-architecture causal models (llama.cpp / Ollama), written with the `gguf` package.

Tensors get llama.cpp's names (gguf's tensor-name map for MODEL_ARCH.LLAMA); q_proj / k_proj rows are
permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one:
W.reshape(h, 2, d/2, n).swapaxes(1, 2).reshape(W.shape), with h = heads (q) or kv heads (k).
Tied embeddings are written once (token_embd); llama.cpp and transformers reuse it as the output layer.
1-D tensors (norms) stay float32. Quantizations: f32, f16, q8_0 (blocks of 32, one f16 scale), q4_0
(blocks of 32 4-bit values; token_embd/output kept at q8_0, as llama.cpp keeps them at higher precision).
A 2-D tensor whose rows are not a multiple of 32 falls back to f16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.errors import MedmergeError

GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_0")
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
    writer.add_tokenizer_pre(_pre_tokenizer_name(source))
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


def _pre_tokenizer_name(source: Path) -> str:
    """llama.cpp's pre-tokenizer name: the one of the GGUF the folder came from, else 'default'."""
    import gguf

    manifest = source / "medmerge-model.json"
    if manifest.is_file():
        origin = json.loads(manifest.read_text()).get("inputs", {}).get("gguf")
        if origin and Path(origin).is_file():
            field = gguf.GGUFReader(origin).get_field("tokenizer.ggml.pre")
            if field is not None:
                return field.contents()
    return "default"


def write_gguf(source: Path, out_file: Path, quantization: str) -> dict[str, Any]:
    """Write the Llama-architecture Hugging Face folder `source` as one GGUF file."""
    import gguf
    from gguf.quants import quantize

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
    writer.add_name(source.name)
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
