"""The data flows one way: data_pipeline never imports omni_ds."""

import pkgutil
import subprocess
import sys

import data_pipeline


def test_data_pipeline_imports_nothing_from_omni_ds():
    modules = [f"data_pipeline.{m.name}" for m in pkgutil.iter_modules(data_pipeline.__path__)]
    assert len(modules) >= 5
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'omni_ds'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
