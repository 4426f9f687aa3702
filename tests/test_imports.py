"""`theory` (and the output helpers the theory commands use) must import and work without torch."""
import subprocess
import sys

BLOCK_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def _run_without_torch(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH + body], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_theory_imports_without_torch():
    assert _run_without_torch(
        "import importlib, pkgutil, theory\n"
        "for m in pkgutil.iter_modules(theory.__path__):\n"
        "    importlib.import_module('theory.' + m.name)\n"
        "assert not any(k == 'torch' or k.startswith('torch.') for k in sys.modules)\n"
        "print('ok')\n"
    ) == "ok"


def test_output_helpers_import_without_torch():
    """experiments.outputs (tables, figures, JSON) serves the theory commands: no torch behind it."""
    assert _run_without_torch(
        "from experiments.outputs import markdown_table, pyplot, save_figure, write_json\n"
        "print(markdown_table(['a', 'b'], [[1.0, None]]).splitlines()[-1])\n"
    ) == "| 1.000 | n/a |"
