"""Studies: short scripts over library calls that hold models against the theory.

* ``demo`` (``run_demo``, ``make_config``, ``bounds_of_run``) -- the tiny-transformer world, exact;
  its report and figures in ``demo_report``;
* ``smollm2`` (``run_study``, ``make_config``) -- ``talr study smollm2``: the paper's experiment on
  SmolLM2-135M-Instruct with real MedCalc-Bench rows; report in ``smollm2_report`` / ``smollm2_text``;
* ``compare`` (``run_compare``, ``CompareConfig``, ``bounds_at``) -- a run of ``talr train``, on
  empirical trees (`sft.treeprobs`), its checkpoints read by `sft.runs`; outputs in ``compare_report``;
* ``forecast`` (``run_study``, ``make_config``) -- validation of `sft.forecast` on a grid of tiny-world
  runs with 3 seeds (runs in ``forecast_grid``, scores in ``forecast_metrics``, outputs in
  ``forecast_report``).

Model-to-tree work lives in `sft.treeprobs`, every bound in `theory.bounds`, output conventions in
`experiments.outputs`.
"""
