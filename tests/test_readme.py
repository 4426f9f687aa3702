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


# --------------------------------------------------------------------------- the training recipes
# Run at tiny size: these substitutions are the only changes, and each must occur in the README
# (so the README cannot drift away from what is tested).
FIXTURE = Path(__file__).resolve().parent / "eval" / "fixtures" / "medcalc_small.csv"
PY_SUBS = {"../shared/data/medcalc-bench-v1.0/test_data.csv": str(FIXTURE), "max_steps=100": "max_steps=2"}
SH_SUBS = {"path/to/hf-folder-or.gguf": "tiny:max_pos=4096", "--epochs 2": "--max-steps 2",
           "--save-steps 50": "--save-steps 1", "talr claims": "talr claims --n 3"}


def _readme():
    return (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(text):
    """Every `talr ...` command of the README's bash blocks, continuations joined, [optional] parts dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip()
            if line.startswith("talr "):
                out.append(line)
    return out


def test_readme_training_recipes_and_commands_run(tmp_path, monkeypatch, capsys):
    import shlex

    from experiments.cli import main

    text = _readme()
    for key in [*PY_SUBS, *SH_SUBS]:
        assert key in text, f"README no longer contains {key!r}: update the tiny-size substitutions"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "general.jsonl").write_text('{"text": "def add(a, b):\\n    return a + b\\n"}\n')
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "sft." in b]
    assert len(blocks) >= 3  # MedCalc data, train(), the Trainer drop-in
    ns: dict = {}
    for block in blocks:
        for old, new in PY_SUBS.items():
            block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["result"].status == "completed" and ns["result"].global_step == 2
    assert (tmp_path / "medcalc_train.jsonl").exists() and (tmp_path / "runs" / "hf").is_dir()
    commands = _commands(text)
    assert any(c.startswith("talr train") for c in commands) and any(c.startswith("talr compare") for c in commands)
    for cmd in commands:
        for old, new in SH_SUBS.items():
            cmd = cmd.replace(old, new)
        argv = shlex.split(cmd)[1:]
        assert main(argv) == 0, (cmd, capsys.readouterr())
    assert (tmp_path / "runs" / "medcalc_talr" / "compare.json").exists()
