"""Per-IP limits of the main listener: in-process and Redis drivers."""
