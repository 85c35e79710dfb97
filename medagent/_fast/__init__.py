"""Cython twins of the hot kernels. Never import these directly: use medagent.proto.*."""
