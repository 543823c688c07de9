"""Hub ids already in the local Hugging Face cache work as model names, offline, as transformers users
expect (a fake cache layout in a temporary HF_HOME holds the tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from medmerge.errors import MedmergeError
from medmerge.models import hub_id, load_model, resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hf_home: Path, repo_id: str, model: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<rev>/…, blobs/…} as huggingface_hub lays it out."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for i, file in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy2(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(hf_home, tiny_llama) -> None:
    snapshot = fake_hub_cache(hf_home, "tiny-org/Tiny-Llama", tiny_llama)
    assert resolve_model("tiny-org/Tiny-Llama") == snapshot
    assert (
        hub_id(snapshot) == "tiny-org/Tiny-Llama" and hub_id("tiny-org/Tiny-Llama") == "tiny-org/Tiny-Llama"
    )
    model = load_model("tiny-org/Tiny-Llama")
    assert model.config.num_hidden_layers == 2


def test_an_uncached_hub_id_is_a_one_line_error(hf_home) -> None:
    with pytest.raises(MedmergeError, match="nor a Hub id in the local Hugging Face cache") as exc:
        resolve_model("nobody/not-there")
    assert "\n" not in str(exc.value) and str(hf_home / "hub") in str(exc.value)


def test_a_folder_wins_over_a_hub_id_of_the_same_spelling(
    hf_home, tiny_llama, tiny_t5, tmp_path, monkeypatch
):
    fake_hub_cache(hf_home, "org/name", tiny_t5)
    shutil.copytree(tiny_llama, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == Path("org/name")


def test_a_mergekit_config_of_hub_ids_merges(hf_home, tiny_llama, tmp_path) -> None:
    from medmerge.cli import main
    from tests.tiny import build_tiny_llama

    fake_hub_cache(hf_home, "org/base", tiny_llama)
    for i in range(2):
        fake_hub_cache(hf_home, f"org/expert-{i}", build_tiny_llama(tmp_path / f"expert-{i}", seed=i + 1))
    config = tmp_path / "mergekit.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": "org/base",
                "models": [
                    {"model": "org/base"},
                    {"model": "org/expert-0", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "org/expert-1", "parameters": {"weight": 0.5, "density": 0.5}},
                ],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(out), "--quiet"]) == 0
    card = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert card["base_model"] == ["org/base", "org/expert-0", "org/expert-1"]
