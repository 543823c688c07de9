"""Optional parts of medmerge and the extra that installs each: a one-line error names the extra.

    search     optuna                       `medmerge run` searches, `medmerge federate`
    qlora      bitsandbytes                 `method: qlora`
    privacy    opacus                       `train.privacy` (DP-SGD)
    export     ctranslate2                  `medmerge export --format ct2`, the ct2 engine
    serve      fastapi, starlette, uvicorn  `medmerge serve`
    federated  flwr, cryptography, psutil   `medmerge federate`

`scripts/setup.sh` installs them all (`.[all]`); `pip install medmerge` alone installs the core.
"""

from __future__ import annotations

import importlib.util

from medmerge.errors import MedmergeError

EXTRAS = {
    "optuna": "search",
    "bitsandbytes": "qlora",
    "opacus": "privacy",
    "ctranslate2": "export",
    "fastapi": "serve",
    "uvicorn": "serve",
    "flwr": "federated",
    "cryptography": "federated",
}


def require(what: str, *modules: str) -> None:
    """Raise a one-line MedmergeError naming the extra to install when one of `modules` is missing."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            extra = EXTRAS[module]
            raise MedmergeError(
                f"{what} needs the optional package {module}: pip install 'medmerge[{extra}]' "
                "(scripts/setup.sh installs every extra)"
            )
