"""The unchanged command under torchrun: 2 CPU processes (gloo), each its own data shard, same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from medmerge.train.expert import DIGEST_ENV
from tests.train.helpers import tiny_config


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    config = tiny_config(
        tiny_llama, tiny_qa_jsonl, max_steps=6, eval_every=3, checkpoint_every=3, lora={"dropout": 0.1}
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out, digests = tmp_path / "expert", tmp_path / "digests"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medmerge.cli",
        "train",
        str(path),
        "--out",
        str(out),
        "--quiet",
    ]
    env = {**os.environ, DIGEST_ENV: str(digests), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (digests / "rank0.txt").read_text(), (digests / "rank1.txt").read_text()
    assert rank0 == rank1 and len(rank0) == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["metrics"]["steps"] == 6
    assert manifest["metrics"]["val_loss_final"] < manifest["metrics"]["val_loss_initial"]
    assert done.stdout.count("expert written to") == 1  # only rank 0 reports and writes
