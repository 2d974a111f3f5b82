"""The benchmark suite: ``python -m bench`` or ``make bench``. Not tests."""
