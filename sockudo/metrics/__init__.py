"""Metrics: the registry wrapper, constant labels, the TCP exporter."""
