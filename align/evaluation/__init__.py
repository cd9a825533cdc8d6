"""How a stage is judged: gold evaluation, scoring, best-of-n, stage metrics, the run report and its plots."""
