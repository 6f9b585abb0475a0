"""The framework adapters' tests drive real frameworks, which the ckptd extras install
(``scripts/test`` installs all three). A test module whose framework is missing is skipped on a
developer's machine and fails collection under ``CI=true`` (see :mod:`tests._requirements`)."""

from __future__ import annotations

import importlib.util

from tests._requirements import in_ci

NEEDS = {
    "test_lightning.py": ("lightning", "lightning"),
    "test_hf.py": ("transformers", "hf"),
    "test_accelerate.py": ("accelerate", "accelerate"),
}
"""Each test module: the module it imports, and the ckptd extra that installs it."""


def _missing(module: str, extra: str) -> bool:
    if importlib.util.find_spec(module) is not None:
        return False
    what = f"{module} is not installed (pip install 'ckptd[{extra}]'; scripts/test installs it)"
    if in_ci():
        raise RuntimeError(f"{what}; CI=true: the adapter tests must run, not skip")
    return True


collect_ignore = [name for name, (module, extra) in NEEDS.items() if _missing(module, extra)]
