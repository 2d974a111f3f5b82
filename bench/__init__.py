"""The benchmark suite (issue 8): ``python -m bench`` or ``make bench``. Not tests."""
