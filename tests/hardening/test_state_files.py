"""Lab names, state and lock files: a root tool must not be steered outside /run/labctl."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labctl.errors import BadNameError, UnsafePathError
from labctl.lab import clean, state
from labctl.names import check_ifname, check_lab_name, lab_name_problem
from tests.conftest import LabFactory

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")


@pytest.mark.parametrize(
    "name",
    ["../../etc", "..", "a/b", "lab\n", "lab\x1b[2J", "", "-x", "_x", "x" * 33, "ebdiag42", "lab.node", "läb", "a b"],
)
def test_bad_lab_names_are_refused(name: str) -> None:
    assert lab_name_problem(name) is not None
    with pytest.raises(BadNameError):
        check_lab_name(name)


@pytest.mark.parametrize("name", ["demo", "rx-path", "t1234x0", "A_b-9", "x" * 32, "ebdiag"])
def test_good_lab_names_pass(name: str) -> None:
    assert check_lab_name(name) == name


@pytest.mark.parametrize("name", ["all", "default", "ééééééééé", "a/b", "eth\n0", "", "x" * 16])
def test_bad_interface_names(name: str) -> None:
    with pytest.raises(BadNameError):
        check_ifname(name)


def _run_listing() -> set[str]:
    found = set()
    for root, dirs, files in os.walk("/run"):
        if root.startswith(("/run/labctl", "/run/netns", "/run/user", "/run/systemd")):
            dirs[:] = []
            continue
        found |= {os.path.join(root, f) for f in files + dirs}
    return found


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["clean", "--lab"], "../../etc"),
        (["clean", "--lab"], "..x"),
        (["clean", "--lab"], "x\ny"),
        (["down"], ".."),
        (["down"], "x\ny"),
        (["status"], ".."),
        (["exec"], ".."),
    ],
)
def test_bad_names_exit_2_and_create_nothing(command: list[str], name: str, tmp_path: Path) -> None:
    before = _run_listing()
    argv = [LABCTL, *command, name] + (["node", "--", "true"] if command == ["exec"] else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "lab name" in result.stderr
    assert not os.path.exists("/run/etc.lock") and not os.path.exists("/run/etc.json")
    assert _run_listing() - before == set()


@pytest.mark.parametrize("command", [["down"], ["status"], ["exec"]])
def test_a_directory_for_a_lab_file_is_a_message(command: list[str], tmp_path: Path) -> None:
    argv = [LABCTL, *command, str(tmp_path)] + (["node", "--", "true"] if command == ["exec"] else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["down"], ["status"], ["exec"]])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: x\xff\n", "not UTF-8 text"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nesting"),
        (b"a: &a [x]\nb: *a\n" * 2, "not valid YAML"),
    ],
    ids=["non-utf8", "deep-nesting", "duplicate-anchor-keys"],
)
def test_a_hostile_lab_file_for_down_status_exec_is_a_message(
    command: list[str], content: bytes, message: str, tmp_path: Path
) -> None:
    file = tmp_path / "hostile.yaml"
    file.write_bytes(content)
    argv = [LABCTL, *command, str(file)] + (["node", "--", "true"] if command == ["exec"] else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {file}:"), result.stderr


@pytest.mark.parametrize("command", [["down"], ["status"], ["exec"]])
def test_a_directory_named_like_a_lab_is_an_unknown_lab(command: list[str], tmp_path: Path) -> None:
    """``labctl down labs`` in a folder that has ``labs/``: a lab name, not a file -- and no such lab is up."""
    (tmp_path / "labs").mkdir()
    argv = [LABCTL, *command, "labs"] + (["node", "--", "true"] if command == ["exec"] else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "lab labs is not up" in result.stderr, result.stderr


def test_clean_lab_validates_in_process() -> None:
    with pytest.raises(BadNameError):
        clean.clean_all("../../etc")


def test_a_symlinked_lock_is_refused_and_its_target_not_created(lab_name: str, tmp_path: Path) -> None:
    target = tmp_path / "created-by-root"
    link = Path(state.LABS_DIR) / f"{lab_name}.lock"
    state.known_labs()  # makes the directory
    link.symlink_to(target)
    try:
        with pytest.raises(UnsafePathError), state.locked(lab_name):
            pass
        assert not target.exists()
    finally:
        link.unlink()


def test_a_symlinked_state_file_is_not_read_nor_deleted(lab_name: str, tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text(f'{{"name": "{lab_name}", "file": "x", "status": "up", "nodes": {{}}}}')
    link = Path(state.LABS_DIR) / f"{lab_name}.json"
    link.symlink_to(target)
    try:
        with pytest.raises(UnsafePathError):
            state.load(lab_name)
        state.save(state.LabState(name=lab_name, file="y", status="up", nodes={}))  # replaces the link itself
        assert '"file": "x"' in target.read_text() and not link.is_symlink()
        state.forget(lab_name)
        assert target.exists()
    finally:
        link.unlink(missing_ok=True)


def test_a_state_directory_that_is_a_symlink_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labctl.kernel import registry

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafePathError):
        registry.open_dir(str(tmp_path / "link"))
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafePathError):
        registry.open_dir(str(loose))


def test_the_lock_file_goes_when_the_lab_has_no_state(lab_name: str) -> None:
    lock = Path(state.LABS_DIR) / f"{lab_name}.lock"
    with state.locked(lab_name):
        assert lock.exists()
    assert not lock.exists()
    state.save(state.LabState(name=lab_name, file="f", status="up", nodes={}))
    try:
        with state.locked(lab_name):
            pass
        assert lock.exists()  # a lab that is up keeps its lock file
        with state.locked(lab_name):
            state.forget(lab_name)
        assert not lock.exists()
    finally:
        state.forget(lab_name)


def test_down_removes_the_lock_file(make_lab: LabFactory, lab_name: str) -> None:
    from labctl.lab import build

    make_lab("topology:\n  nodes:\n    a: {}\n")
    assert (Path(state.LABS_DIR) / f"{lab_name}.lock").exists()
    build.down(lab_name)
    assert not (Path(state.LABS_DIR) / f"{lab_name}.lock").exists()


def test_a_waiter_on_a_removed_lock_takes_a_fresh_one(lab_name: str) -> None:
    """Removing a lock file while another process waits on it must never give two holders."""
    held = threading.Event()
    inside: list[str] = []

    def second() -> None:
        held.wait()
        with state.locked(lab_name):
            inside.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with state.locked(lab_name):  # no state: the file is removed on the way out
        held.set()
        time.sleep(0.2)
        inside.append("first")
    thread.join(5)
    assert inside == ["first", "second"]
    assert not (Path(state.LABS_DIR) / f"{lab_name}.lock").exists()


def test_known_labs_skips_names_that_are_not_labs(lab_name: str) -> None:
    odd = Path(state.LABS_DIR) / "..hidden.json"
    odd.write_text("{}")
    try:
        assert "..hidden" not in state.known_labs()
    finally:
        odd.unlink()


def test_clean_removes_only_free_lock_files_of_gone_labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labs = tmp_path / "labs"
    monkeypatch.setattr(state, "LABS_DIR", str(labs))
    state.known_labs()  # makes the directory, 0700
    for name in ("gone", "busy", "kept"):
        (labs / f"{name}.lock").touch()
    target = tmp_path / "target"
    (labs / "link.lock").symlink_to(target)
    with state.locked("busy"):
        state.save(state.LabState(name="busy", file="f", status="up", nodes={}))
        state.remove_lock_files(keep={"kept"})
        assert sorted(p.name for p in labs.iterdir()) == ["busy.json", "busy.lock", "kept.lock", "link.lock"]
    assert not target.exists()


def test_a_registry_is_rewritten_only_when_its_body_changed_it(tmp_path: Path) -> None:
    """locked_json: a release from an empty registry (every down) leaves the file alone; a change is written."""
    from labctl.kernel.registry import locked_json

    path = str(tmp_path / "reg" / "globals.json")
    os.makedirs(os.path.dirname(path), mode=0o700)
    with locked_json(path) as data:
        data["net.core.netdev_max_backlog"] = {"original": "1000", "owners": {"lab:x": "8"}}
    first = os.stat(path).st_ino
    with locked_json(path) as data:
        assert data["net.core.netdev_max_backlog"]["original"] == "1000"  # read, nothing changed
    assert os.stat(path).st_ino == first  # not replaced
    with locked_json(path) as data:
        data.clear()
    assert os.stat(path).st_ino != first and Path(path).read_text() == "{}"
