"""The MedCalc judge does bounded work on adversarial model output (issue 13, bug 8).

Each call runs under a 5 s SIGALRM that raises inside the judge: a call that would hang (on the
old judge ``pow(7, 10**8)`` built a 10^8-digit integer, > 40 s) FAILS the test instead of
hanging it. No assertion is made on how fast a call is.
"""
import signal
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.eval import medcalc as mc

ROW = {"Calculator ID": "2", "Output Type": "decimal", "Ground Truth Answer": "5", "Lower Limit": "4.75",
       "Upper Limit": "5.25"}
INT_ROW = {"Calculator ID": "4", "Output Type": "integer", "Ground Truth Answer": "3", "Lower Limit": "3",
           "Upper Limit": "3"}
WEEKS_ROW = {"Calculator ID": "69", "Output Type": "integer", "Ground Truth Answer": "('4 weeks', '0 days')",
             "Lower Limit": "", "Upper Limit": ""}


class JudgeDidNotReturn(AssertionError):
    pass


@contextmanager
def alarm(seconds=5.0):
    def fire(signum, frame):
        raise JudgeDidNotReturn(f"the judge did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def judge_all(text):
    with alarm():
        return [mc.is_correct(text, row) for row in (ROW, INT_ROW, WEEKS_ROW)]


def test_the_reported_pow_is_refused():
    assert judge_all('<answer>{"answer": str(pow(7, 10**8))}</answer>') == [False, False, False]
    assert judge_all("str(((99**99)**99)**99)")[0] is False
    assert judge_all("str(round(5, -10**8))")[0] is False  # int round with huge ndigits
    assert judge_all("9" * 100_000 + " weeks 3 days")[2] is False  # int() of a 100k-digit string


def test_legitimate_arithmetic_still_judged_as_the_official_code():
    assert judge_all('<answer>{"answer": str(2**2 + 1)}</answer>')[0] is True
    assert judge_all("str(pow(25, 0.5))")[0] is True
    assert judge_all("str(round(5.04, 1))")[0] is True
    assert judge_all('{"answer": "3 out of 5"}')[1] is True


def _number():
    return st.one_of(st.integers(0, 10**6).map(str), st.integers(1, 3000).map(lambda n: "9" * n),
                     st.sampled_from(["1e308", "10**8", "10**100", "0.5", "-7"]))


def _expr():
    return st.recursive(
        _number(),
        lambda inner: st.one_of(
            st.tuples(inner, inner).map(lambda ab: f"{ab[0]}**{ab[1]}"),
            st.tuples(inner, inner).map(lambda ab: f"pow({ab[0]}, {ab[1]})"),
            st.tuples(inner, inner).map(lambda ab: f"({ab[0]})*({ab[1]})"),
            st.tuples(inner, inner).map(lambda ab: f"round({ab[0]}, {ab[1]})"),
            inner.map(lambda a: f"({a})"),
            inner.map(lambda a: f"exp({a})"),
        ),
        max_leaves=12,
    )


def _output():
    e = _expr()
    return st.one_of(
        e.map(lambda x: f'<answer>{{"answer": str({x})}}</answer>'),
        e.map(lambda x: f"str({x})"),
        st.integers(1, 20_000).map(lambda n: 'answer": ' * n),  # many starts, no closing brace
        st.integers(1, 50_000).map(lambda n: "1" * n),  # a long digit run (quadratic regexes)
        st.integers(1, 20_000).map(lambda n: "1, " * n + "2 out of"),
        st.integers(1, 5_000).map(lambda n: "(" * n + "1"),  # deep nesting
        st.text(alphabet="0123456789*()^,. answerstrpow{}<>/:\"'", max_size=3000),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_output())
def test_adversarial_outputs_return_a_bool_in_bounded_time(text):
    out = judge_all(text)
    assert all(isinstance(v, bool) for v in out)


@settings(max_examples=100, deadline=None)
@given(_expr())
def test_evaluated_expressions_are_bounded_by_the_node_limit(expr):
    """Structural bound: what the evaluator accepts has at most MAX_EXPR_NODES nodes and every
    number it returns is a finite float."""
    import ast

    with alarm():
        v = mc.safe_arith(expr)
    if v is not None:
        assert isinstance(v, float) and abs(v) < float("inf")
        assert sum(1 for _ in ast.walk(ast.parse(expr.replace("^", "**"), mode="eval"))) <= mc.MAX_EXPR_NODES
