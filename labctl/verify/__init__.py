"""Verification labs: run a lab file's checks and judge them on kernel evidence."""
