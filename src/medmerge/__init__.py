"""medmerge: fine-tune small language models on medical Q&A per site, merge them, ship the best merge.

Packages, one per capability (see docs/architecture.md):
    data      Q&A records, loaders for the publishers' formats, group-disjoint splits, prompts.
    train     one training loop for full / LoRA / QLoRA experts, causal and seq2seq.
    merge     merge methods (pure tensor functions) and the streaming merge engine.
    evaluate  answer-quality metrics, the generalization matrix and its report.
    export    edge formats (CTranslate2, GGUF) and answering on a laptop CPU.
    pipeline  `medmerge run`: the whole study in cached steps, and its verdict.
    federated `medmerge federate`: the study as a Flower federation; sites keep their data.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package for one NF4
# kernel is missing; QLoRA runs on its built-in CPU kernels without it. Every step of `medmerge run` runs
# in a child process (medmerge.isolation) that would repeat the line, so only that message is dropped.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)
