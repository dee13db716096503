"""Labs on the kernel: build, converge, tear down, inspect."""
