"""The pure core: wire protocol, signatures, errors, WebSocket framing, per-node bookkeeping."""
