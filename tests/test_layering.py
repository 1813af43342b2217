"""The layering holds at run time: the actors, the HTTP layer and the pure core load without torch.

pyproject.toml's import-linter contracts (``make lint``) check every import statement; this checks
what a real import does (a lazy import inside a function, a plugin hook) in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_FREE = {
    "actors": ["actors"],
    "app.http": ["app/http"],
    "the pure core": [
        "app/batching",
        "app/prompts",
        "app/text",
        "app/cache",
        "app/store",
        "app/contract",
        "app/config.py",
    ],
}


def modules_under(*places: str) -> list[str]:
    found = []
    for place in places:
        path = ROOT / place
        files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
        for file in files:
            parts = file.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def imported_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("layer", sorted(TORCH_FREE))
def test_a_layer_loads_without_torch(layer: str) -> None:
    """Breakage caught: an actor (or a route, or pure code) that imports the engine or torch."""
    modules = modules_under(*TORCH_FREE[layer])
    assert len(modules) > 3, modules
    loaded = imported_after(modules)
    assert "torch" not in loaded and "transformers" not in loaded, f"{layer} pulled in the model stack"


def test_the_pure_core_loads_without_trio_or_the_web_stack() -> None:
    loaded = imported_after(modules_under(*TORCH_FREE["the pure core"]))
    assert not loaded & {"trio", "quart", "quart_trio", "hypercorn", "werkzeug"}, loaded
