"""fastkd benchmarks: one ``bench_<family>.py`` per loss family, run by ``python -m bench.run``."""
