"""Expectations: the registry of kinds a check's ``expect`` may state, and their judges."""
