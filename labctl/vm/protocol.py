"""How results leave the guest: one JSON document on a raw virtio disk, never scraped from the console.

The host gives the guest an empty (sparse) raw disk; the guest writes a header line and the JSON body at
offset 0 and syncs before it powers off.  The header names the protocol, the body's length and its SHA-256,
so a guest that died half-way (or wrote nothing: the disk is all zeros) is told apart from a result::

    LABCTL-RESULT 1 <length> <sha256>\\n<JSON body>

The body: ``{"kernel": {"release", "version"}, "boot_seconds", "run_seconds", "labs": [LabResult.as_dict()],
"error"}``.  The host turns ``labs`` back into the runner's own result objects, so a VM run is reported
exactly as a run here is (:func:`lab_results`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from labctl.expect.base import Row
from labctl.verify.runner import CheckResult, LabResult
from labctl.vm.errors import VmError

MAGIC = b"LABCTL-RESULT"
VERSION = 1
HEADER_MAX = 200
RESULT_DISK_BYTES = 256 * 1024 * 1024
"""Size of the (sparse) result disk: far more than a run of every lab writes."""


class ProtocolError(VmError):
    """The result disk holds no complete result."""


def encode(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, default=str, ensure_ascii=False).encode()
    header = b"%s %d %d %s\n" % (MAGIC, VERSION, len(body), hashlib.sha256(body).hexdigest().encode())
    return header + body


def decode(data: bytes) -> dict[str, Any]:
    """The payload in ``data`` (the disk's bytes); ProtocolError says what is wrong with it."""
    line, newline, _ = data[:HEADER_MAX].partition(b"\n")
    if not newline or not line.startswith(MAGIC):
        if not data[:HEADER_MAX].strip(b"\0"):
            raise ProtocolError("the guest wrote no result (the result disk is empty)")
        raise ProtocolError("the result disk does not start with a labctl result header")
    try:
        _, version, length, digest = line.decode().split(" ")
        size = int(length)
    except ValueError:
        raise ProtocolError(f"bad result header {line[:80]!r}") from None
    if int(version) != VERSION:
        raise ProtocolError(f"result protocol {version}, this labctl reads {VERSION}")
    start = len(line) + 1
    body = data[start : start + size]
    if len(body) != size or hashlib.sha256(body).hexdigest() != digest:
        raise ProtocolError(f"the result is incomplete ({len(body)} of {size} bytes, or its checksum differs)")
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ProtocolError("the result is not a JSON object")
    return payload


def write(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to the result disk (the guest's /dev/vdc) and make sure it reached it."""
    data = encode(payload)
    if len(data) > RESULT_DISK_BYTES:
        payload = {**payload, "labs": [], "error": f"the result ({len(data)} bytes) does not fit the result disk"}
        data = encode(payload)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        header = f.read(HEADER_MAX)
        line = header.partition(b"\n")[0].split(b" ")
        length = int(line[2]) if len(line) == 4 and line[0] == MAGIC and line[2].isdigit() else 0
        return decode(header + f.read(max(0, length + HEADER_MAX - len(header))))


def create_disk(path: str) -> None:
    """An empty, sparse result disk for the guest to write to."""
    with open(path, "wb") as f:
        f.truncate(RESULT_DISK_BYTES)


def _row(data: dict[str, Any]) -> Row:
    return Row(data["what"], data["expected"], data["observed"], data["ok"], data.get("hint", ""),
               list(data.get("detail", [])))


def _check(data: dict[str, Any], kernel: str) -> CheckResult:
    return CheckResult(
        name=data["name"],
        covers=list(data.get("covers", [])),
        description=data.get("description", ""),
        status=data["status"],
        evidence=[_row(r) for r in data.get("evidence", [])],
        observation=data.get("observation", {}),
        seconds=float(data.get("seconds", 0.0)),
        error=data.get("error"),
        explanation=list(data.get("explanation", [])),
        not_provable=list(data.get("not_provable", [])),
        kernel=data.get("kernel") or kernel,
    )


def lab_results(payload: dict[str, Any]) -> list[LabResult]:
    """The guest's results as the runner's own objects, each carrying the guest's kernel."""
    kernel = payload.get("kernel", {}).get("release", "?")
    results = []
    for lab in payload.get("labs", []):
        results.append(
            LabResult(
                lab=lab["lab"],
                file=lab["file"],
                checks=[_check(c, kernel) for c in lab.get("checks", [])],
                seconds=float(lab.get("seconds", 0.0)),
                error=lab.get("error"),
                kernel=lab.get("kernel") or kernel,
            )
        )
    return results
