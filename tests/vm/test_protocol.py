"""The guest → host result protocol and the job disk, without a VM."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from labctl.expect.base import Row
from labctl.verify.results import CheckResult, LabResult
from labctl.vm import job, protocol


def _lab() -> LabResult:
    check = CheckResult("closed-port", ["R7"], "no socket", "fail",
                        [Row("dropped", 1, {"matching": 0}, False, "a hint", ["line 1"])], {"x": 1}, 0.5,
                        None, ["packet 1: …"], [], kernel="6.1.0-50-cloud-amd64")
    skipped = CheckResult("e3", ["E3"], "", "skip", [Row("kernel has it", ["CONFIG_X"], "lacks", True)], {}, 0.0,
                          not_provable=["CONFIG_X"], kernel="6.1.0-50-cloud-amd64")
    return LabResult("rx-path", "labs/rx-path.yaml", [check, skipped], 3.0, None, kernel="6.1.0-50-cloud-amd64")


def test_round_trip_through_a_disk(tmp_path: Path) -> None:
    disk = tmp_path / "result.img"
    protocol.create_disk(str(disk))
    payload = {"kernel": {"release": "6.1.0-50-cloud-amd64", "version": "#1"}, "labs": [_lab().as_dict()]}
    protocol.ResultWriter(str(disk)).write(payload)
    back = protocol.lab_results(protocol.read(str(disk)))
    assert [lab.as_dict() for lab in back] == [_lab().as_dict()]
    assert back[0].checks[0].evidence[0].detail == ["line 1"] and back[0].kernel == "6.1.0-50-cloud-amd64"


def test_an_empty_disk_says_the_guest_wrote_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "result.img"
    protocol.create_disk(str(disk))
    with pytest.raises(protocol.ProtocolError, match="wrote no result"):
        protocol.read(str(disk))


def test_the_newest_complete_write_is_read(tmp_path: Path) -> None:
    """Writes alternate between the two slots; the one with the highest sequence is the result."""
    disk = tmp_path / "result.img"
    protocol.create_disk(str(disk))
    writer = protocol.ResultWriter(str(disk))
    for done in range(1, 4):
        writer.write({"labs": [{"lab": f"lab{i}"} for i in range(done)], "finished": done == 3})
        read = protocol.read(str(disk))
        assert len(read["labs"]) == done and read["finished"] == (done == 3)


def test_a_write_torn_by_a_crash_leaves_the_one_before(tmp_path: Path) -> None:
    """A guest that dies while writing (a panic, the timeout's kill) leaves a torn slot: the other one, the
    results up to the lab before, is read -- never the torn one, never nothing."""
    disk = tmp_path / "result.img"
    protocol.create_disk(str(disk))
    writer = protocol.ResultWriter(str(disk))
    writer.write({"labs": [], "running": "labs/a.yaml", "finished": False})
    writer.write({"labs": [{"lab": "a"}], "running": "labs/b.yaml", "finished": False})
    torn = protocol.encode({"labs": [{"lab": "a"}, {"lab": "b"}], "finished": True}, 3)
    with open(disk, "r+b") as f:  # sequence 3 goes to slot 1: only half of it reached the disk
        f.seek(protocol.SLOT_BYTES)
        f.write(torn[: len(torn) // 2])
    assert protocol.read(str(disk)) == {"labs": [{"lab": "a"}], "running": "labs/b.yaml", "finished": False}


def test_a_cut_result_is_refused() -> None:
    data = protocol.encode({"labs": [], "kernel": {}})
    with pytest.raises(protocol.ProtocolError, match="incomplete"):
        protocol.decode(data[:-3])
    with pytest.raises(protocol.ProtocolError, match="header"):
        protocol.decode(b"Linux version 6.1 ...\n")
    with pytest.raises(protocol.ProtocolError, match="result protocol 1, this labctl reads 2"):
        protocol.decode(b"LABCTL-RESULT 1 2 " + b"0" * 64 + b"\n{}")  # an older guest's one-slot header
    with pytest.raises(protocol.ProtocolError, match="bad result header"):
        protocol.decode(b"LABCTL-RESULT 2 x 2 " + b"0" * 64 + b"\n{}")


def test_records_without_kernel_take_the_payloads() -> None:
    lab = _lab().as_dict()
    del lab["kernel"]
    for check in lab["checks"]:
        del check["kernel"]
    back = protocol.lab_results({"kernel": {"release": "6.1.0-x"}, "labs": [lab]})
    assert back[0].kernel == "6.1.0-x" and {c.kernel for c in back[0].checks} == {"6.1.0-x"}


def test_job_disk_holds_source_labs_and_script(tmp_path: Path) -> None:
    lab = tmp_path / "mine.yaml"
    lab.write_text("name: mine\n")
    dest = tmp_path / "job.tar"
    job.pack(["labs/rx-path.yaml", str(lab)], "closed", "run", dest)
    assert dest.stat().st_size % 512 == 0
    with tarfile.open(dest) as tar:
        names = tar.getnames()
    assert "src/labctl/vm/guest.py" in names and "guest.sh" in names and "job.json" in names
    assert "work/labs/rx-path.yaml" in names and "work/_files/1/mine.yaml" in names
    assert not any("__pycache__" in n for n in names)


def test_guest_paths_stay_inside_the_work_folder() -> None:
    assert job.guest_path("labs/x.yaml", 0) == "labs/x.yaml"
    assert job.guest_path("../x.yaml", 3) == "_files/3/x.yaml"
    assert job.guest_path("/etc/x.yaml", 1) == "_files/1/x.yaml"
