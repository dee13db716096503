"""The one error of the VM runner: QEMU missing, an image that cannot be built, a guest that hung."""

from __future__ import annotations

from labctl.errors import LabctlError


class VmError(LabctlError):
    """The VM part could not do its job (exit 1); the message says what and where its log is."""
