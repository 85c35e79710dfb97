"""Fixtures of the end-to-end tests; the machinery is in serve_harness.py."""

from serve_harness import serve_factory  # noqa: F401 - re-exported as a fixture
