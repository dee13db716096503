"""twin.yaml is the attribution test's lab (one check fails on purpose): test_twins.py runs it, pytest must not collect it."""

collect_ignore = ["twin.yaml", "twin_worker.py", "twin_noise.py"]
