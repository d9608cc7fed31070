"""The package version: one place, read by pyproject (setuptools `attr:`), the handshake and `prism_edge`."""

__version__ = "0.1.0"
