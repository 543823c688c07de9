"""The unchanged command under torchrun: 2 CPU processes (gloo), each its own data shard, same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.train.helpers import tiny_config

# Runs `medmerge train` in each torchrun process, with a loop hook (train_expert's `hooks`) that keeps
# the model, and writes a digest of that process's final weights to DIGESTS/rank<RANK>.txt.
WRAPPER = """
import hashlib, os, sys
from pathlib import Path

import medmerge.train
from medmerge.cli import main

digests, argv = Path(sys.argv[1]), sys.argv[2:]
seen = {}
train_expert = medmerge.train.train_expert


def keep_model(trainer, step):
    seen["model"] = trainer.model


def with_hook(*args, **kwargs):
    return train_expert(*args, **kwargs, hooks=[keep_model])


medmerge.train.train_expert = with_hook
code = main(argv)
digest = hashlib.sha256()
for name, p in sorted(seen["model"].named_parameters()):
    digest.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
digests.mkdir(parents=True, exist_ok=True)
(digests / f"rank{os.environ['RANK']}.txt").write_text(digest.hexdigest())
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    config = tiny_config(
        tiny_llama, tiny_qa_jsonl, max_steps=6, eval_every=3, checkpoint_every=3, lora={"dropout": 0.1}
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out, digests = tmp_path / "expert", tmp_path / "digests"
    wrapper = tmp_path / "train_with_digest.py"
    wrapper.write_text(WRAPPER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(wrapper),
        str(digests),
        "train",
        str(path),
        "--out",
        str(out),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (digests / "rank0.txt").read_text(), (digests / "rank1.txt").read_text()
    assert rank0 == rank1 and len(rank0) == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["metrics"]["steps"] == 6
    assert manifest["metrics"]["val_loss_final"] < manifest["metrics"]["val_loss_initial"]
    assert done.stdout.count("expert written to") == 1  # only rank 0 reports and writes
