"""The TCP metrics exporter: wire format (and its client) and the exporter itself."""
