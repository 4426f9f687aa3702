"""`talr --help`, `talr bounds|claims|simulate` (and `talr train --help`) work where torch and
transformers cannot be imported: a subprocess makes both imports fail before running the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = ("import sys\n"
         "for name in ('torch', 'transformers', 'accelerate', 'peft', 'trl'):\n"
         "    sys.modules[name] = None  # `import torch` now raises ImportError\n"
         "from experiments.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
         "sys.exit(rc)\n")


def _talr(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_the_block_really_blocks():
    proc = subprocess.run([sys.executable, "-c", BLOCK.replace("from experiments.cli import main", "import torch")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["simulate", "--help"]], ids=lambda a: a[0])
def test_help_without_torch(argv):
    proc = _talr(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: talr" in proc.stdout


def test_theory_commands_without_torch(tmp_path):
    proc = _talr("bounds", "degradation", "--T", "100", "--delta-star", "1", "--mu-T", "0.5", "--C1", "1", "--C2", "1",
                 "--A", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["bound"] > 0
    proc = _talr("claims", "--n", "3", "--only", "Lemma E.3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Lemma E.3" in proc.stdout
    proc = _talr("simulate", "--steps", "2", "--out", str(tmp_path / "sim"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["rows"] == 3 and (tmp_path / "sim" / "delta_L.png").exists()
