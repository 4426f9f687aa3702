"""talr.theory -- numpy/scipy/sympy only (never torch).

Token trees, the LLM compression protocol, divergences on trees, exponential tilting,
the bounds of arXiv 2509.20758 as functions of their constants, constant estimation and
exact simulators.
"""
