"""The gateway container's image (``GATEWAY_PACKAGES`` on debian-slim, plus the Modal client
the runtime brings) must hold every package the gateway imports, pinned as in uv.lock: an
import missing there only shows as a crash on Modal."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

from packaging.requirements import Requirement

from vllm_autoserve.gateway import GATEWAY_PACKAGES

# What the gateway function imports when Modal starts it (gateway.py's `gateway()` body).
_GATEWAY_IMPORTS = """
import json, sys
import vllm_autoserve.app, vllm_autoserve.auth, vllm_autoserve.logs
import vllm_autoserve.pools.modal
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


# Imported when installed, not needed: anyio tries `import sniffio` and goes on without it.
_OPTIONAL = {"sniffio"}


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` install, with their dependencies (markers evaluated)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = _normal(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pins_match_the_installed_lock() -> None:
    for spec in GATEWAY_PACKAGES:
        name, version = spec.split("==")
        assert importlib.metadata.version(name) == version, spec


def test_every_package_the_gateway_imports_is_in_its_image() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _GATEWAY_IMPORTS], capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    providers = importlib.metadata.packages_distributions()
    imported = {_normal(dist) for module in modules for dist in providers.get(module, [])}
    imported -= {"vllm-autoserve", *_OPTIONAL}
    image = _closure({spec.split("==")[0] for spec in GATEWAY_PACKAGES} | {"modal"})
    assert imported - image == set()
