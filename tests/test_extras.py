"""A command whose optional package is missing says, in one line, which extra installs it."""

from __future__ import annotations

import importlib.util

import pytest

from medmerge.cli import main
from medmerge.errors import MedmergeError
from medmerge.extras import EXTRAS, require


def _hide(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a)
    )


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_each_missing_package_names_its_extra(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, module)
    with pytest.raises(MedmergeError, match=rf"pip install 'medmerge\[{EXTRAS[module]}\]'") as err:
        require("this command", module)
    assert "\n" not in str(err.value)


def test_every_extra_is_declared_and_in_all() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    (everything,) = declared["all"]  # medmerge[search,qlora,…]: one self-reference
    in_all = set(everything.partition("[")[2].rstrip("]").split(","))
    assert set(EXTRAS.values()) <= set(declared) and set(EXTRAS.values()) <= in_all
    for module, extra in EXTRAS.items():  # each package is installed by the extra named for it
        assert any(req.lower().startswith(module) for req in declared[extra]), (module, extra)


def test_serve_without_fastapi_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _hide(monkeypatch, "fastapi")
    assert main(["serve", "smollm2-135m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "medmerge[serve]" in err
