"""`theory` must import (and work) without torch."""
import subprocess
import sys


def test_theory_imports_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib, pkgutil, theory\n"
        "for m in pkgutil.iter_modules(theory.__path__):\n"
        "    importlib.import_module('theory.' + m.name)\n"
        "assert not any(k == 'torch' or k.startswith('torch.') for k in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_output_helpers_import_without_torch():
    """experiments.outputs (tables, figures, JSON) serves the theory commands: no torch behind it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from experiments.outputs import markdown_table, pyplot, save_figure, write_json\n"
        "print(markdown_table(['a', 'b'], [[1.0, None]]).splitlines()[-1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "| 1.000 | n/a |"
