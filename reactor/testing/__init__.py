"""Test doubles other projects can use in their own tests: :mod:`reactor.testing.orchestrator`, the
orchestrator double (``python -m reactor.testing.serve`` runs it alone)."""
