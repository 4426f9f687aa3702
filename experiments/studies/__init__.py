"""Studies: short scripts over library calls that hold models against the theory.

* ``demo`` (``run_demo``, ``make_config``, ``bounds_of_run``) -- the tiny-transformer world, exact;
  its report and figures in ``demo_report``;
* ``compare`` (``run_compare``, ``CompareConfig``, ``bounds_at``) -- a run of ``talr train``, on
  empirical trees (`sft.treeprobs`), its checkpoints read by `sft.runs`; outputs in ``compare_report``.

Model-to-tree work lives in `sft.treeprobs`, every bound in `theory.bounds`, output conventions in
`experiments.outputs`.
"""
