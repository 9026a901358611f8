"""Prometheus metrics: hot-path instruments, the registry rendered at scrape time, the loopback
HTTP server."""
