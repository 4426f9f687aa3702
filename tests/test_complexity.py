"""Every function of theory/sft/experiments has cyclomatic complexity <= 20 (McCabe, counted as radon does).

The count starts at 1 and adds one per decision: ``if`` / ``elif`` / conditional expression, loop
(plus one for its ``else``), ``except`` handler (plus one for a ``try``'s ``else``), each extra operand
of ``and`` / ``or``, each comprehension ``for`` and its ``if`` filters, each ``match`` case. A nested
function or class is a function of its own: its decisions do not count for the one around it.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 20
_OWN_SCOPE = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def complexity(fn: ast.AST) -> int:
    """Cyclomatic complexity of one function node (see the module docstring)."""
    n = 1
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, _OWN_SCOPE):
            continue
        if isinstance(node, (ast.If, ast.IfExp, ast.match_case)):
            n += 1
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            n += 1 + bool(node.orelse)
        elif isinstance(node, ast.Try):
            n += len(node.handlers) + bool(node.orelse)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        stack.extend(ast.iter_child_nodes(node))
    return n


def functions(source: str, where: str = "") -> dict[str, int]:
    """``{"where:name": complexity}`` for every function (nested ones included) of ``source``."""
    return {f"{where}:{node.name}": complexity(node) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def project_functions() -> dict[str, int]:
    out: dict[str, int] = {}
    for root in ("theory", "sft", "experiments"):
        for f in sorted((ROOT / root).rglob("*.py")):
            out.update(functions(f.read_text(), str(f.relative_to(ROOT))))
    return out


HAND = '''
def straight(x):
    return x + 1

def branches(x, ys):
    if x > 0 and x < 10 or x == 42:       # if: 1, and/or: 2
        return [y for y in ys if y if y > 1]  # comprehension: 1 + 2 filters
    elif x < 0:                            # elif: 1
        for y in ys:                       # for with else: 2
            pass
        else:
            pass
    try:
        x = 1 if x else 2                  # conditional expression: 1
    except ValueError:                     # two handlers and an else: 3
        pass
    except TypeError:
        pass
    else:
        pass
    while x:                               # while: 1
        x -= 1

        def inner(z):                      # its own function: not counted above
            if z:
                return 1
            return 2
    return x

def matcher(c):
    match c:
        case 1:
            return "a"
        case 2:
            return "b"
        case _:
            return "c"
'''


def test_counter_on_hand_counted_functions():
    got = functions(textwrap.dedent(HAND))
    assert got == {":straight": 1, ":branches": 1 + 1 + 2 + 3 + 1 + 2 + 1 + 3 + 1, ":inner": 2, ":matcher": 4}


def test_counter_sees_a_function_grow():
    """One more branch, one more point: the project check cannot pass by accident."""
    body = "def f(x):\n" + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(LIMIT)) + "    return -1\n"
    assert functions(body)[":f"] == LIMIT + 1


@pytest.mark.parametrize("name, before", [
    ("sft/eval/synth_medcalc.py:case", 33), ("experiments/studies/demo_report.py:write", 37),
    ("experiments/studies/compare.py:run_compare", 24)])
def test_split_functions_stay_split(name, before):
    """The three functions this check split (cyclomatic complexity before the split in the id)."""
    assert project_functions()[name] <= LIMIT < before


def test_every_function_at_most_20():
    over = sorted(((c, name) for name, c in project_functions().items() if c > LIMIT), reverse=True)
    assert over == [], "cyclomatic complexity above 20:\n" + "\n".join(f"  {c:3d} {name}" for c, name in over)
