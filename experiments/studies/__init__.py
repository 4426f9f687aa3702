"""Studies: short scripts over library calls that hold models against the theory.

* ``demo`` (``run_demo``, ``make_config``, ``bounds_of_run``) -- the tiny-transformer world, exact;
  its report and figures in ``demo_report``;
* ``grid`` (``run_study``, ``make_config``) -- ``talr study grid --domain NAME`` (alias ``talr study
  smollm2`` for MedCalc): the paper's experiment on SmolLM2-135M-Instruct (or a tiny Llama) on a domain
  of `sft.domains`; summary in ``grid_report``, markdown and figure in ``grid_text`` (grid -> grid_report
  -> grid_text, no loop);
* ``compare`` (``run_compare``, ``CompareConfig``, ``bounds_at``) -- a run of ``talr train``, on
  empirical trees (`sft.treeprobs`), its checkpoints read by `sft.runs`; outputs in ``compare_report``;
* ``forecast`` (``run_study``, ``make_config``) -- validation of `sft.forecast` on a grid of tiny-world
  runs with 3 seeds (runs in ``forecast_grid``, scores in ``forecast_metrics``, outputs in
  ``forecast_report``).

Model-to-tree work lives in `sft.treeprobs`, every bound in `theory.bounds`, output conventions in
`experiments.outputs`.
"""
