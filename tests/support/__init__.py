"""Fixtures and helpers the tests share (tests/conftest.py registers the fixtures)."""
