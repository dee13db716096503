"""Running labs on another kernel: a QEMU guest booted from a cached Debian 12 image.

- :mod:`image` builds and caches the disk image (Debian's own 6.1 kernel, the Debian packages setup.sh
  installs, a venv of labctl's dependencies);
- :mod:`qemu` installs QEMU on first use, picks KVM when it works and TCG otherwise, boots with a timeout;
- :mod:`job` packs labctl's source and the lab files for one run, and :mod:`protocol` carries the results
  back on a raw disk as JSON (never scraped from the console);
- :mod:`guest` is what runs inside; :mod:`kernels` names the kernels a user asks for;
- :mod:`diff` makes the check × kernel verdict table.
"""
