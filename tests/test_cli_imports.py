"""`chtsl --help` stays light, and `import chtsl_infer` keeps registering the Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ("info", "train", "plot", "export", "bench", "generate", "eval", "sweep")
HEAVY = ("torch", "transformers", "datasets", "lm_eval", "onnx", "onnxruntime", "numpy")


def _fresh(code: str) -> str:
    """stdout of `code` in a fresh interpreter (this process has torch imported already)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_imports_neither_torch_nor_transformers() -> None:
    out = _fresh(f"""
import json, sys
from typer.testing import CliRunner
from chtsl_infer.cli import app
codes = [CliRunner().invoke(app, args).exit_code for args in [["--help"]] + [[c, "--help"] for c in {COMMANDS!r}]]
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"codes": codes, "heavy": heavy}}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"codes": [0] * (len(COMMANDS) + 1), "heavy": []}


@pytest.mark.slow  # fresh interpreter per method
def test_import_chtsl_infer_registers_auto_classes(tiny_checkpoint: Path) -> None:
    for first in ("import chtsl_infer", "import transformers, chtsl_infer"):
        out = _fresh(f"""
{first}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tiny_checkpoint)!r})
print(type(model).__name__, model.config.method)
""")
        assert out.split() == ["ChtslLlamaForCausalLM", "chtsl"]
