"""``python -m tests.integration.system_config_ckptd ARGS``: ``ckptd ARGS`` with the system config
path (``/etc/ckptd/ckptd.toml`` in production) replaced by the file named in
``TEST_SYSTEM_CONFIG``, so a test can put a poisoned "system" config in place without touching
``/etc`` and show that the environments it gives daemons never let the lookup reach it.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_CONFIG_ENV = "TEST_SYSTEM_CONFIG"


def main() -> None:
    import ckptd.config

    ckptd.config.SYSTEM_CONFIG = Path(os.environ[SYSTEM_CONFIG_ENV])
    from ckptd.cli.main import main as ckptd_main

    ckptd_main()


if __name__ == "__main__":
    main()
