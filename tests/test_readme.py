"""The README's Python tour runs as written (keeps the documentation true)."""
import re
from pathlib import Path


def test_readme_theory_snippets_run():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    theory_blocks = [b for b in blocks if "sft." not in b]
    assert len(theory_blocks) >= 2
    ns: dict = {}
    for block in theory_blocks:
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["num_bits"] >= ns["ideal_code_length_bits"](ns["z"], ns["probs"])
