"""How results leave the guest: JSON documents on a raw virtio disk, never scraped from the console.

The host gives the guest an empty (sparse) raw disk with two slots.  The guest writes the payload after every
lab, alternating slots, each a header line and the JSON body, synced before the next lab starts::

    LABCTL-RESULT 2 <sequence> <length> <sha256>\\n<JSON body>

Why two slots and a sequence: a guest whose kernel panics (or that is killed at its timeout) may die in the
middle of a write.  The other slot then still holds the results up to the lab before, and the host reads the
complete slot with the highest sequence.  The header's length and SHA-256 tell a torn write (or a disk the
guest never wrote: all zeros) from a result.

The body: ``{"kernel": {"release", "version"}, "boot_seconds", "run_seconds", "labs": [LabResult.as_dict()],
"finished", "running", "error"}``: ``finished`` is false in the writes made during the run, and ``running``
names the lab file the guest started next -- the lab a crash interrupted.  The host turns ``labs`` back into
the runner's own result objects, so a VM run is reported exactly as a run here is (:func:`lab_results`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, BinaryIO

from labctl.expect.base import Row
from labctl.verify.results import CheckResult, LabResult
from labctl.vm.errors import VmError

MAGIC = b"LABCTL-RESULT"
VERSION = 2
HEADER_MAX = 200
RESULT_DISK_BYTES = 256 * 1024 * 1024
"""Size of the (sparse) result disk: far more than a run of every lab writes, twice."""
SLOT_BYTES = RESULT_DISK_BYTES // 2
"""Each of the two slots: a write goes to slot ``sequence % 2``."""


class ProtocolError(VmError):
    """The result disk holds no complete result."""


def encode(payload: dict[str, Any], sequence: int = 0) -> bytes:
    body = json.dumps(payload, default=str, ensure_ascii=False).encode()
    header = b"%s %d %d %d %s\n" % (MAGIC, VERSION, sequence, len(body), hashlib.sha256(body).hexdigest().encode())
    return header + body


def decode(data: bytes) -> tuple[int, dict[str, Any]]:
    """The sequence and payload in ``data`` (one slot's bytes); ProtocolError says what is wrong with it."""
    line, newline, _ = data[:HEADER_MAX].partition(b"\n")
    if not newline or not line.startswith(MAGIC):
        if not data[:HEADER_MAX].strip(b"\0"):
            raise ProtocolError("the guest wrote no result (the result disk is empty)")
        raise ProtocolError("the result disk does not start with a labctl result header")
    fields = line.decode(errors="replace").split(" ")
    if len(fields) > 1 and fields[1] != str(VERSION):  # before the layout: a v1 header has one field less
        raise ProtocolError(f"result protocol {fields[1][:20]}, this labctl reads {VERSION}")
    try:
        _, _, number, length, digest = fields
        sequence, size = int(number), int(length)
    except ValueError:
        raise ProtocolError(f"bad result header {line[:80]!r}") from None
    start = len(line) + 1
    body = data[start : start + size]
    if len(body) != size or hashlib.sha256(body).hexdigest() != digest:
        raise ProtocolError(f"the result is incomplete ({len(body)} of {size} bytes, or its checksum differs)")
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ProtocolError("the result is not a JSON object")
    return sequence, payload


class ResultWriter:
    """The guest's side: each :meth:`write` goes to the other slot, so the last complete one survives a crash."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sequence = 0

    def write(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` to the result disk (the guest's /dev/vdc) and make sure it reached it."""
        self.sequence += 1
        data = encode(payload, self.sequence)
        if len(data) > SLOT_BYTES:
            payload = {**payload, "labs": [], "error": f"the result ({len(data)} bytes) does not fit the result disk"}
            data = encode(payload, self.sequence)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, (self.sequence % 2) * SLOT_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_slot(f: BinaryIO, slot: int) -> tuple[int, dict[str, Any]]:
    f.seek(slot * SLOT_BYTES)
    header = f.read(HEADER_MAX)
    line = header.partition(b"\n")[0].split(b" ")
    length = int(line[3]) if len(line) == 5 and line[0] == MAGIC and line[3].isdigit() else 0
    return decode(header + f.read(max(0, min(length, SLOT_BYTES) + HEADER_MAX - len(header))))


def read(path: str) -> dict[str, Any]:
    """The newest complete payload on the disk; ProtocolError (the first slot's reason) when there is none."""
    found: list[tuple[int, dict[str, Any]]] = []
    first_error: ProtocolError | None = None
    with open(path, "rb") as f:
        for slot in (0, 1):
            try:
                found.append(_read_slot(f, slot))
            except ProtocolError as exc:
                first_error = first_error or exc
    if not found:
        assert first_error is not None
        raise first_error
    return max(found, key=lambda item: item[0])[1]


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
