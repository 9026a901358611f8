"""A private Postfix with ``mqpolicy serve`` beside it and an SMTP sink behind it, an SMTP
client, readiness and process helpers: for ``mqpolicy demo``, the end-to-end tests and
benchmarks."""
