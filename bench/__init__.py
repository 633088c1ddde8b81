"""fastkd benchmarks: one ``bench_<stem>.py`` per loss family (a :class:`bench.family.Family`), run by
``python -m bench.run``; ``measure``, ``report`` and ``plot`` are the harness."""
