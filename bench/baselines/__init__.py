"""Baseline servers the suite measures Sockudo against, each a standalone script."""
