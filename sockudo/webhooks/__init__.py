"""Webhooks: pure model, the server's sink, queues (embedded, RQ), markers, delivery."""
