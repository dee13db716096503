"""One module per expectation kind; each registers itself with :func:`labctl.expect.base.register`."""
