"""pytest plugin: lab files with checks become test items (filled in by the verification labs)."""
