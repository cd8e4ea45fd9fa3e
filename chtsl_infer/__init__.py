"""chtsl_infer: the CHTsL layer, the model and its config, presets, sparse formats and runtime.

Importing it registers `ChtslConfig` / `ChtslLlamaForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained("ckpt/", use_safetensors=True)` loads a CHTsL checkpoint
without remote code (and never a pickle).

Nothing heavy is imported here: the public names below load on first access, and the Auto
registration (with the runtime's fast path for `from_pretrained` models, `runtime/hf.py`) happens
as soon as transformers is imported and the import that brought it in has completed (at once when
it already is). So the `chtsl` CLI, whose modules live in this package, answers `--help` without
torch or transformers.
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
    """Registers the config and model with transformers' AutoConfig / AutoModelForCausalLM and the
    runtime's fast path into the model class (idempotent): imports `chtsl_infer.runtime.hf`, which
    imports the model modules (they register the Auto classes) and installs itself as
    `ChtslLlamaForCausalLM.runtime_hooks` (the model layer cannot import the runtime above it)."""
    importlib.import_module(f"{__name__}.runtime.hf")


def _initializing(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class _WhenSettled(importlib.abc.MetaPathFinder):
    """Calls `register_auto_classes` once transformers is imported and no module of this package is
    half-imported, whichever import completes that (then leaves `sys.meta_path`).

    Registering needs transformers and imports most of the package; done in the middle of one of
    our imports (say `chtsl_infer.formats.packed`, which imports the model, which imports
    transformers), it would re-enter the half-imported module. So every import of transformers and
    of our submodules is watched until then: `import chtsl_infer` followed by `from transformers
    import AutoModelForCausalLM`, or `from chtsl_infer.formats.packed import pack_model` first, both
    end with the classes registered and the fast path installed, while `chtsl --help` (which never
    imports transformers) imports neither.
    """

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != "transformers" and not fullname.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:  # the spec the other finders give, its loader wrapped
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenSettle(spec.loader, self)
                return spec
        return None

    def settle(self, done: str) -> None:
        watched = [n for n in list(sys.modules) if n == "transformers" or n.startswith(f"{__name__}.")]
        if "transformers" in sys.modules and not any(_initializing(n) for n in watched if n != done):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                register_auto_classes()


class _ThenSettle(importlib.abc.Loader):
    """A module's own loader, then `_WhenSettled.settle` once the module is executed."""

    def __init__(self, loader: Any, watcher: _WhenSettled) -> None:
        self.loader, self.watcher = loader, watcher

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped (inspect, resources)
        self.watcher.settle(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...: the module's loader's
        return getattr(self.loader, name)


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(f, _WhenSettled) for f in sys.meta_path):
    sys.meta_path.insert(0, _WhenSettled())
