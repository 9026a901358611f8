"""A private Postfix and an SMTP sink, for ``mqpolicy demo``, the end-to-end tests and
benchmarks."""
