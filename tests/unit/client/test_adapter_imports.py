"""Importing ``ckptd_client`` never imports a framework, and an adapter whose framework is
missing says which extra installs it (in a fresh interpreter: first ``import ckptd_client``,
then each adapter with its framework made unimportable)."""

from __future__ import annotations

import json
import subprocess
import sys

ADAPTERS = {"lightning": "lightning", "hf": "transformers", "accelerate": "accelerate"}
"""Adapter module -> the framework it imports (the ckptd extra has the adapter's name)."""

SCRIPT = f"""
import json, sys
import ckptd_client, ckptd_client.client, ckptd_client.api
frameworks = [*{list(ADAPTERS.values())!r}, "pytorch_lightning"]
out = {{"imported": [m for m in frameworks if m in sys.modules], "errors": {{}}}}
for adapter, framework in {ADAPTERS!r}.items():
    sys.modules[framework] = None  # `import framework` now raises ImportError
    try:
        __import__("ckptd_client." + adapter)
    except ImportError as exc:
        out["errors"][adapter] = str(exc)
print(json.dumps(out))
"""


def test_no_framework_is_imported_and_a_missing_one_names_its_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["imported"] == [], "import ckptd_client imported a framework"
    assert sorted(out["errors"]) == sorted(ADAPTERS)
    for adapter, message in out["errors"].items():
        assert f"pip install 'ckptd[{adapter}]'" in message, message
