"""medmerge: fine-tune small language models on medical Q&A per site, merge them, ship the best merge.

Packages, one per capability (see docs/architecture.md):
    data      Q&A records, loaders for the publishers' formats, group-disjoint splits, prompts.
    train     one training loop for full / LoRA / QLoRA experts, causal and seq2seq.
    merge     merge methods (pure tensor functions) and the streaming merge engine.
    evaluate  answer-quality metrics, the generalization matrix and its report.
    export    edge formats (CTranslate2, GGUF) and answering on a laptop CPU.
"""

__version__ = "0.1.0"
