"""chtsl_infer: the CHTsL layer, the model and its config, presets, sparse formats and runtime.

Importing it registers `ChtslConfig` / `ChtslLlamaForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained("ckpt/", use_safetensors=True)` loads a CHTsL checkpoint
without remote code (and never a pickle).

Nothing heavy is imported here: the public names below load on first access, and the Auto
registration happens as soon as transformers is imported (at once when it already is). So the
`chtsl` CLI, whose modules live in this package, answers `--help` without torch or transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it (imported on first access)
_EXPORTS = {
    "LAYER_TYPES": "model.layers",
    "SparseLowRankLinear": "model.layers",
    "alignment_loss": "model.layers",
    "branch_cosine": "model.layers",
    "ocr": "model.layers",
    "record_branches": "model.layers",
    "METHODS": "model.methods",
    "Method": "model.methods",
    "get_method": "model.methods",
    "ChtslConfig": "model.configuration",
    "ChtslLlamaForCausalLM": "model.modeling",
    "PRESETS": "model.presets",
    "build_config": "model.presets",
    "get_preset": "model.presets",
    "ChtslError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def register_auto_classes() -> None:
    """Registers the config and model with transformers' AutoConfig / AutoModelForCausalLM
    (idempotent; `chtsl_infer.model.modeling` does it on import)."""
    importlib.import_module(f"{__name__}.model.modeling")


def _register_unless_busy() -> None:
    # Not while one of our modules is half-imported (it is importing transformers itself, and
    # registering would import it circularly): `chtsl_infer.model.configuration` and
    # `chtsl_infer.model.modeling` register their class when their own import completes.
    busy = any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for n, m in list(sys.modules.items()) if n.startswith(f"{__name__}."))
    if not busy:
        register_auto_classes()


def _install_runtime_hooks() -> None:
    """Imports `chtsl_infer.runtime.hf`, which installs itself as `ChtslLlamaForCausalLM.runtime_hooks`
    (the model layer cannot import the runtime above it)."""
    importlib.import_module(f"{__name__}.runtime.hf")


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `then()` right after module `name` finishes importing (one shot): `transformers` ->
    `register_auto_classes`, so `import chtsl_infer` followed by `from transformers import
    AutoModelForCausalLM` finds our classes; `chtsl_infer.model.modeling` -> the runtime's hooks, so
    however the model class is reached, `from_pretrained` models compute on the runtime."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self.then()


def _after_import(name: str, then: Any) -> None:
    if name in sys.modules:
        then()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


_after_import(f"{__name__}.model.modeling", _install_runtime_hooks)  # first: the next line may import it
_after_import("transformers", _register_unless_busy)
