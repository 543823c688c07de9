"""DP's randomness is secret: batches and noise come from os.urandom-seeded generators that are never
written, so two DP runs of one config differ while non-DP runs stay bit-identical."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge.train.dp as dp
from medmerge.train import train_expert
from tests.train.helpers import tiny_config


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_dp_runs_of_one_config_differ_and_two_plain_runs_do_not(tiny_llama, tiny_qa_jsonl, tmp_path):
    """Same config, same seed: the DP adapters differ (secret sampling and noise); the non-DP adapters
    are identical (seed still fixes everything else)."""
    privacy = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    common = {"max_steps": 4, "eval_every": 0, "autocast": "off", "lora": {"dropout": 0.1}}
    dp_config = tiny_config(tiny_llama, tiny_qa_jsonl, privacy=privacy, **common)
    plain_config = tiny_config(tiny_llama, tiny_qa_jsonl, **common)
    for name, config in [("dp1", dp_config), ("dp2", dp_config), ("p1", plain_config), ("p2", plain_config)]:
        train_expert(config, tmp_path / name, progress=False)
    assert _same(_adapter(tmp_path / "p1"), _adapter(tmp_path / "p2"))
    assert not _same(_adapter(tmp_path / "dp1"), _adapter(tmp_path / "dp2"))


def _files(*folders: Path) -> list[Path]:
    return [f for folder in folders for f in folder.rglob("*") if f.is_file()]


def test_the_secret_seeds_are_written_nowhere(tiny_llama, tiny_qa_jsonl, tmp_path, monkeypatch, capfd):
    """Every secret generator's seed (decimal, hex, its 8 bytes either way round) and the start of its
    state appear in no file of the expert folder, of an interrupted run's checkpoint, or in the logs."""
    made: list[torch.Generator] = []
    real = dp.secret_generator

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(dp, "secret_generator", spy)
    import medmerge.train.privacy as privacy

    monkeypatch.setattr(privacy, "secret_generator", spy)
    config = tiny_config(
        tiny_llama,
        tiny_qa_jsonl,
        privacy={"noise_multiplier": 1.0},
        max_steps=6,
        eval_every=3,
        checkpoint_every=2,
        autocast="off",
    )

    def ctrl_c(trainer, step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_expert(config, tmp_path / "e", progress=False, hooks=[ctrl_c])
    checkpoint = tmp_path / "e.checkpoint"
    assert checkpoint.is_dir()
    secrets_before = list(made)
    interrupted = {f: f.read_bytes() for f in _files(checkpoint)}
    train_expert(config, tmp_path / "e", resume=True, progress=False)
    assert len(made) == 4 and len(secrets_before) == 2  # sampling + noise, fresh ones after the resume
    seeds = [g.initial_seed() for g in made]
    assert len(set(seeds)) == 4
    contents = interrupted | {f: f.read_bytes() for f in _files(tmp_path / "e")}
    out, err = capfd.readouterr()
    contents[Path("<stdout+stderr>")] = (out + err).encode()
    assert any(f.name == "manifest.json" for f in contents) and any("checkpoint" in str(f) for f in contents)
    for seed in seeds:
        needles = [
            str(seed).encode(),
            f"{seed:x}".encode(),
            seed.to_bytes(8, "little"),
            seed.to_bytes(8, "big"),
        ]
        for file, data in contents.items():
            assert not any(n in data for n in needles), (seed, file)
    for g in made:
        # a fresh generator with the same seed: the start of its Mersenne-Twister state
        state = torch.Generator().manual_seed(g.initial_seed()).get_state().numpy().tobytes()[8:72]
        assert not any(state in data for data in contents.values())


def test_gaussian_noise_for_releases_is_secret_and_calibrated() -> None:
    """The noise the statistics helpers add: N(0, std²) (Opacus's secure-mode construction), and two
    secret generators draw different noise."""
    like = torch.zeros(200_000)
    a = dp.gaussian_noise(like, 3.0, dp.secret_generator())
    b = dp.gaussian_noise(like, 3.0, dp.secret_generator())
    assert not torch.equal(a, b)
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 3.0) < 0.03
