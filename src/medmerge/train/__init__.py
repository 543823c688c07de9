"""Fine-tuning experts: one loop for full, LoRA and QLoRA, causal and seq2seq, one or many processes.

>>> from medmerge.config import load_config, TrainConfig
>>> from medmerge.train import train_expert
>>> train_expert(load_config("configs/train-lora-medquad.yaml", TrainConfig), "runs/lora-medquad")

Modules: batching (length-grouped, seeded, per-rank batches), model (full / lora / qlora builders),
examples (data layer → token ids), loop (the loop), checkpoint (atomic resume), curve (CSV + PNG),
precision (device, bf16 autocast, process group), expert (the public call and the output folder).
"""

from medmerge.train.expert import train_expert

__all__ = ["train_expert"]
