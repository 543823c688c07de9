"""A fresh clone with no `../shared/` beside it: bare dataset names fail with one actionable line when
nothing is found offline, and load from `$MEDMERGE_DATA` when it names a mirror folder. The resolver
runs in a subprocess from the clone's own `src`, in a bare venv that `scripts/setup.sh` never touched.

The same checks run on the working tree, and `scripts/setup.sh` is run on a stub checkout to check that
it registers `../shared/datasets` only when it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.data.test_loaders_files import MEDQUAD_DOC

REPO = Path(__file__).resolve().parents[2]
CHECK = """
import json, sys
import medmerge
from medmerge.data import load_dataset
from medmerge.errors import MedmergeError
result = {"module": medmerge.__file__}
try:
    result["pairs"] = len(load_dataset(sys.argv[1]))
except MedmergeError as exc:
    result["error"] = str(exc)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv's python (no setup.sh mirror registered) that sees this venv's installed packages."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "parent-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module", params=["clone", "worktree"])
def source_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout to run: a `git clone` of HEAD (no sibling shared/), or this working tree."""
    if request.param == "worktree":
        return REPO
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path_factory.mktemp("machine") / "medmerge"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert not (clone.parent / "shared").exists()
    if not (clone / "src" / "medmerge" / "data" / "resolve.py").is_file():
        pytest.skip("HEAD predates the dataset resolver: commit the working tree to run this check")
    return clone


def _run(python: Path, root: Path, spec: str, tmp: Path, **env: str) -> dict[str, str]:
    """Load `spec` from `root/src` in a subprocess with a controlled environment; its JSON result."""
    cache = tmp / "cache"
    cache.mkdir(exist_ok=True)
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp), "PYTHONPATH": str(root / "src")}
    environment |= {"MEDMERGE_CACHE": str(cache), "MEDMERGE_OFFLINE": "1", **env}
    done = subprocess.run(
        [python, "-c", CHECK, spec], cwd=root, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert Path(result["module"]).is_relative_to(root / "src")
    return result


def test_nothing_found_offline_is_one_actionable_line(bare_python, source_root, tmp_path):
    result = _run(bare_python, source_root, "medquad", tmp_path)
    assert result["error"] == (
        f"dataset 'medquad' not found: no MedQuAD-master.zip in MEDMERGE_DATA (unset), "
        f"{tmp_path / 'cache' / 'datasets'} (cache), and no download (offline: MEDMERGE_OFFLINE=1); "
        "set MEDMERGE_DATA=FOLDER (a folder holding MedQuAD-master.zip) "
        "or run `medmerge data fetch medquad --from FILE`"
    )


def _mirror(folder: Path) -> Path:
    """A mirror folder in the publishers' layout: a tiny MedQuAD zip (commit-archive top folder) and
    a tiny PubMedQA file."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "MedQuAD-master.zip", "w") as z:
        for doc, focus in (("0000001", "Gout"), ("0000002", "Asthma")):
            z.writestr(f"MedQuAD-577bd37b96c0/3_GHR_QA/{doc}.xml", MEDQUAD_DOC.format(doc=doc, focus=focus))
    pubmedqa = {
        str(i): {"QUESTION": f"Q{i}?", "LONG_ANSWER": "Yes.", "final_decision": "yes"} for i in range(3)
    }
    (folder / "pubmedqa_ori_pqal.json").write_text(json.dumps(pubmedqa))
    return folder


@pytest.mark.parametrize(("spec", "pairs"), [("medquad", 2), ("pubmedqa", 3)])
def test_medmerge_data_names_a_mirror(bare_python, source_root, tmp_path, spec, pairs):
    mirror = _mirror(tmp_path / "mirror")
    result = _run(bare_python, source_root, spec, tmp_path, MEDMERGE_DATA=f"{tmp_path / 'none'}:{mirror}")
    assert result.get("pairs") == pairs, result


def _stub_checkout(root: Path) -> Path:
    """scripts/setup.sh, pyproject.toml and constraints.txt with an installed-looking .venv stamped as up
    to date (the stamp is setup.sh's: the hash of those files and the MEDMERGE_TORCH choice)."""
    (root / "scripts").mkdir(parents=True)
    files = ("pyproject.toml", "constraints.txt", "scripts/setup.sh")
    for name in files:
        shutil.copy(REPO / name, root / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "medmerge"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    stamp = hashlib.sha256(b"".join((root / name).read_bytes() for name in files) + b"torch: \n")
    (root / ".venv" / ".medmerge-install-stamp").write_text(stamp.hexdigest() + "\n")
    return root


def test_setup_registers_shared_datasets_only_when_present(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMERGE_TORCH", raising=False)
    checkout = _stub_checkout(tmp_path / "medmerge")
    mirrors = checkout / ".venv" / "medmerge-data-mirrors.txt"
    shared = tmp_path / "shared" / "datasets"
    shared.mkdir(parents=True)
    for _ in range(2):  # idempotent
        subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, check=True, timeout=60)
        assert mirrors.read_text() == f"{shared.resolve()}\n"
    shutil.rmtree(tmp_path / "shared")
    subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, check=True, timeout=60)
    assert not mirrors.exists()
