"""Filled in by its own issue; see docs/architecture.md."""
