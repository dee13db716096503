"""What a run reports: a check's verdict with its evidence rows, a lab's checks.

Apart from the runner so that a process which only collects and prints
results (``labctl run -j``'s own process, the reports) need not import what
runs a check -- the traffic, tracing and netfilter code -- only what a result
holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labctl.expect.base import Row
from labctl.kernel import version

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


@dataclass
class CheckResult:
    name: str
    covers: list[str]
    description: str
    status: str
    evidence: list[Row]
    observation: dict[str, Any]
    seconds: float
    error: str | None = None
    explanation: list[str] = field(default_factory=list)
    not_provable: list[str] = field(default_factory=list)
    """Kernel options this kernel lacks, or the kernel range the check holds for (status 'skip')."""
    kernel: str = field(default_factory=version.release)
    """The kernel release the check ran on (a VM run reports the guest's)."""
    recorded: Evidence | None = field(default=None, repr=False)
    """The Evidence itself (its captured frames and paths for an HTML report); not in the JSON form."""
    pcap: str | None = None
    """The pcapng file of the check's captures, with verdicts as comments (``run --pcap DIR``)."""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "covers": self.covers,
            "description": self.description,
            "status": self.status,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "not_provable": self.not_provable,
            "kernel": self.kernel,
            "evidence": [e.as_dict() for e in self.evidence],
            "explanation": self.explanation,
            "observation": self.observation,
            **({"pcap": self.pcap} if self.pcap else {}),
        }


@dataclass
class LabResult:
    lab: str
    file: str
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    kernel: str = field(default_factory=version.release)
    """The kernel release the lab ran on (a VM run reports the guest's)."""

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.status in ("pass", "skip") for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "file": self.file,
            "kernel": self.kernel,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "checks": [c.as_dict() for c in self.checks],
        }
