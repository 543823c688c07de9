"""Builders of tiny random models for tests: hidden 32, 2 layers, a 300-token byte-level BPE tokenizer.

Built once per session (see conftest.py); every model folder is a real Hugging Face folder
(config.json, model.safetensors, tokenizer), so it exercises the same code paths as real models.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "What is (are) diabetes ? Diabetes is a disease in which blood glucose levels are too high.",
    "What are the symptoms of asthma ? Wheezing, coughing, chest tightness and shortness of breath.",
    "How to prevent influenza ? Get a flu vaccine every year and wash your hands often.",
    "Doctor, I have a headache and fever. You may have a viral infection; rest and drink fluids.",
    "Is hypertension inherited ? High blood pressure can run in families, along with lifestyle factors.",
    "What causes anemia ? Anemia is caused by too few red blood cells or too little hemoglobin.",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(kind: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on CORPUS; T5-style specials for seq2seq, ChatML for causal."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "seq2seq":
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(specials.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    if kind == "seq2seq":  # T5 appends </s> to every encoder input
        eos_id = backend.token_to_id("</s>")
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_input_names=["input_ids", "attention_mask"], **specials
    )
    if kind == "causal":
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_llama(out: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32 by default, MLP 2×hidden, 4 heads, 2 kv heads, untied embeddings) with
    random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("causal")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_t5(out: Path, seed: int = 0) -> Path:
    """A 2+2-layer T5 (d_model 32, 4 heads of 8, untied embeddings like flan-t5) with random weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer("seq2seq")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
