"""talr.experiments -- the `talr` CLI, the demo, studies, reports and benchmarks."""
