"""Serials, history stores, replay buffers and resume, history reads, idempotent publish."""
