"""Operator commands: ``python -m sockudo webhooks ...`` and ``python -m sockudo metrics ...``."""
