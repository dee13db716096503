"""labctl: build Linux network labs on the real kernel and prove how packets travel."""

__version__ = "0.1.0"
