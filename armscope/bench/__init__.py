"""``armscope bench --suite``: every stage alone and the whole pipeline, the
inference matrix with its peers and the machine's limit, glass-to-glass
latency, power where the machine tells it; one JSON, the BENCHMARKS.md section
regenerated from it, and plots. Modules: ``timing`` (summaries, interleaved
rounds), ``machine``, ``sampling`` (Jetson/NVML power and clocks), ``limits``
(FLOPs and peak), ``stages``, ``inference`` + ``peers``, ``glass``, ``report``;
the run itself is ``suite.run_suite``."""
