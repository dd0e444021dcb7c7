"""The sans-I/O core: framing, grammar, session state machine, protections.

Nothing under this package may import Twisted; tests/core/test_sans_io.py enforces it.
"""
