"""The twin lab (one check fails on purpose) is run by test_twins.py: pytest must not collect it."""

collect_ignore = ["twin.yaml", "twin_worker.py", "twin_noise.py"]
