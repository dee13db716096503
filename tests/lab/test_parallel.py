"""labctl run -j: labs in worker processes, the ones that need the host to themselves alone, exact per-lab verdicts."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labctl.errors import KernelLacksError
from labctl.kernel import netns
from labctl.verify import parallel
from labctl.verify.parallel import RunLock, Turns, alone_reason, lab_alone_reason, new_run_name, parse_jobs
from labctl.verify.scope import lab_files, load_lab_file
from tests.lab.test_verify import TWO_NODES

REPO = Path(__file__).resolve().parents[2]
CHECKS = """\
checks:
  - name: closed-port
    traffic:
      - udp: {node: client, to: "10.0.7.2:9", count: COUNT}
    expect:
      dropped: {reason: NO_SOCKET, count: COUNT}
"""


def _lab(tmp_path: Path, name: str, count: int, extra: str = "") -> str:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\n{extra}{TWO_NODES}{CHECKS.replace('COUNT', str(count))}")
    return str(file)


def _reason(file: str) -> str | None:
    try:
        return alone_reason(load_lab_file(file))
    except KernelLacksError:  # a lab this kernel cannot build runs nothing, alone or not
        return None


def test_labs_that_need_the_host_alone() -> None:
    reasons = {Path(f).name: _reason(f) for f in lab_files([str(REPO / "labs")])}
    assert "netdev_max_backlog" in (reasons["rx-backlog.yaml"] or "")  # a host-wide sysctl
    assert "full-qdisc-drops" in (reasons["tx-path.yaml"] or "")  # a check marked alone: true (that check only)
    assert reasons["rx-path.yaml"] is None
    assert all(r is None for name, r in reasons.items() if name not in ("rx-backlog.yaml", "tx-path.yaml"))


def test_only_host_wide_sysctls_take_the_whole_lab_alone() -> None:
    """rx-backlog holds the run from up to down; tx-path only for its check marked alone: true."""
    backlog = load_lab_file(str(REPO / "labs/rx-backlog.yaml"))
    tx = load_lab_file(str(REPO / "labs/tx-path.yaml"))
    assert lab_alone_reason(backlog) and lab_alone_reason(tx) is None
    alone = [c.name for c in tx.checks if parallel.check_alone_reason(c)]
    assert alone == ["full-qdisc-drops"]


class _Recorder:
    def __init__(self) -> None:
        self.taken: list[str] = []

    @contextlib.contextmanager
    def held(self, alone: bool) -> Iterator[None]:
        self.taken.append("X" if alone else "S")
        yield


def test_turns_lock_each_phase_or_the_whole_lab() -> None:
    tx = load_lab_file(str(REPO / "labs/tx-path.yaml"))
    by_name = {c.name: c for c in tx.checks}
    lock = _Recorder()
    turns = Turns(lock, whole=False)  # type: ignore[arg-type]
    with turns.lab():
        for phase in (None, by_name["no-route"], by_name["full-qdisc-drops"], None):
            with turns.phase(phase):
                pass
    assert lock.taken == ["S", "S", "X", "S"]  # up, a check, the alone check, down
    whole = _Recorder()
    turns = Turns(whole, whole=True)  # type: ignore[arg-type]
    with turns.lab(), turns.phase(by_name["full-qdisc-drops"]):
        pass
    assert whole.taken == ["X"]  # once, from before up to after down


def test_jobs_auto_and_longest_labs_first() -> None:
    assert parse_jobs("3", 34) == 3
    assert parse_jobs("auto", 34) == parallel.auto_jobs(34) == min(34, parallel.JOBS_PER_CORE * (os.cpu_count() or 1))
    assert parse_jobs("auto", 2) == 2
    for bad in ("0", "-1", "x"):
        with contextlib.suppress(ValueError):
            parse_jobs(bad, 5)
            raise AssertionError(f"-j {bad} accepted")
    files = [str(REPO / "labs" / name) for name in ("nat.yaml", "tcp-connect.yaml", "rx-backlog.yaml", "router.yaml")]
    durations = {files[0]: 3.0, files[1]: 8.0, files[3]: 0.3}
    order = sorted(files, key=lambda f: parallel._sort_key(f, None, durations))
    assert [Path(f).name for f in order] == ["rx-backlog.yaml", "tcp-connect.yaml", "nat.yaml", "router.yaml"]


def test_a_check_judging_softnet_or_marked_alone_makes_its_lab_alone(tmp_path: Path) -> None:
    softnet = tmp_path / "s.yaml"
    softnet.write_text(
        f"name: s\n{TWO_NODES}checks:\n  - name: c\n    traffic: [{{udp: {{node: client, to: '10.0.7.2:9'}}}}]\n"
        "    expect: {softnet: {'0': {processed: '>=0'}}}\n"
    )
    assert "softnet" in (alone_reason(load_lab_file(str(softnet))) or "")
    marked = tmp_path / "m.yaml"
    marked.write_text(f"name: m\n{TWO_NODES}{CHECKS.replace('COUNT', '1')}    alone: true\n")
    assert "alone: true" in (alone_reason(load_lab_file(str(marked))) or "")
    assert alone_reason(load_lab_file(str(marked)), select="no-such-check") is None  # only the selected checks count


def _hold(run: str, alone: bool, log: str, entered: Any, release: Any) -> None:
    with RunLock(run).held(alone):
        with open(log, "a") as f:
            f.write(f"{'X' if alone else 'S'}+\n")
        entered.set()
        release.wait(30)
        with open(log, "a") as f:
            f.write(f"{'X' if alone else 'S'}-\n")


def test_run_lock_shares_and_excludes(tmp_path: Path) -> None:
    run = new_run_name()
    log = tmp_path / "log"
    log.touch()
    ctx = multiprocessing.get_context("spawn")
    release = ctx.Event()
    entered = [ctx.Event() for _ in range(3)]
    shared = [ctx.Process(target=_hold, args=(run, False, str(log), entered[i], release)) for i in range(2)]
    alone_release = ctx.Event()  # referenced until the child has it (a collected semaphore cannot be unpickled)
    alone = ctx.Process(target=_hold, args=(run, True, str(log), entered[2], alone_release))
    try:
        for p in shared:
            p.start()
        assert entered[0].wait(30) and entered[1].wait(30)  # two labs hold it at once
        alone.start()
        time.sleep(0.5)
        assert "X+" not in log.read_text()  # the alone lab waits for both
        release.set()
        assert entered[2].wait(30)
        alone_release.set()
        for p in [*shared, alone]:
            p.join(30)
    finally:
        release.set()
        alone_release.set()
        RunLock(run).remove()
    order = log.read_text().split()
    assert order.index("X+") > max(i for i, what in enumerate(order) if what == "S-"), order


def test_run_j2_runs_labs_at_once_with_exact_verdicts(tmp_path: Path, lab_name: str) -> None:
    """Two labs with the same addresses and device names, different drop counts, traced at the same time."""
    files = [_lab(tmp_path, f"{lab_name}a", 3), _lab(tmp_path, f"{lab_name}b", 5)]
    out = subprocess.run(
        [str(Path(sys.executable).with_name("labctl")), "run", "-j", "2", "--json", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    labs = json.loads(out.stdout)["labs"]
    assert [lab["lab"] for lab in labs] == [f"{lab_name}a", f"{lab_name}b"]  # the order given, whatever ran first
    assert all(lab["passed"] for lab in labs)
    assert not netns.list_labctl(f"{lab_name}a") and not netns.list_labctl(f"{lab_name}b")


def test_run_j2_reports_a_broken_lab_and_runs_the_others(tmp_path: Path, lab_name: str) -> None:
    broken = tmp_path / f"{lab_name}x.yaml"
    broken.write_text(f"name: {lab_name}x\ntopology: {{nodes: {{a: {{bogus: 1}}}}}}\nchecks: []\n")
    files = [str(broken), _lab(tmp_path, f"{lab_name}c", 2)]
    out = subprocess.run(
        [str(Path(sys.executable).with_name("labctl")), "run", "-j", "2", "--json", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr + out.stdout
    labs = json.loads(out.stdout)["labs"]
    assert labs[0]["error"] and "bogus" in labs[0]["error"]
    assert labs[1]["passed"]


def test_run_j_sends_evidence_back_only_for_an_html_report(tmp_path: Path, lab_name: str) -> None:
    """A worker's result crosses to labctl as a pickle: its Evidence (megabytes for a traced burst) only when
    the report will draw it."""
    files = [_lab(tmp_path, f"{lab_name}e", 1), _lab(tmp_path, f"{lab_name}f", 1)]
    plain, _ = parallel.run_labs(files, 2)
    drawn, _ = parallel.run_labs(files, 2, evidence=True)
    assert all(r.passed for r in plain + drawn)
    assert [c.recorded for r in plain for c in r.checks] == [None, None]
    assert all(c.recorded is not None and c.recorded.events for r in drawn for c in r.checks)


def test_observations_are_made_only_for_the_reports_that_print_them(tmp_path: Path, lab_name: str) -> None:
    """``labctl run`` prints verdict rows; --json and --junit print each check's evidence as data too.  Without
    them no worker turns its Evidence into dicts, nor pickles them to labctl (rx-backlog's: 7 MB, 0.4 s to
    unpickle); the verdicts are the same."""
    files = [_lab(tmp_path, f"{lab_name}o", 2), _lab(tmp_path, f"{lab_name}p", 1)]
    bare, _ = parallel.run_labs(files, 2, observations=False)
    full, _ = parallel.run_labs(files, 2)
    assert all(r.passed for r in bare + full)
    assert [c.observation for r in bare for c in r.checks] == [{}, {}]
    assert all(c.observation["packets"] for r in full for c in r.checks)
    assert [[e.as_dict() for e in c.evidence] for r in bare for c in r.checks] == [
        [e.as_dict() for e in c.evidence] for r in full for c in r.checks
    ]
    labctl = str(Path(sys.executable).with_name("labctl"))
    human = subprocess.run([labctl, "run", "-j", "2", *files], capture_output=True, text=True, timeout=120)
    assert human.returncode == 0, human.stderr + human.stdout
    assert "dropped: NO_SOCKET" in human.stdout  # the rows are printed all the same
    as_json = subprocess.run([labctl, "run", "--json", files[0]], capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout)["labs"][0]["checks"][0]["observation"]["packets"]


PRELOAD_PROBE = """\
import importlib, sys
from labctl.verify.workers import WORKER_PRELOAD
for module in WORKER_PRELOAD:
    importlib.import_module(module)
before = set(sys.modules)
from labctl.verify.runner import run_lab
result = run_lab(sys.argv[1])
assert result.checks and not result.error, result.error
print(" ".join(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("labctl", "scapy", "pyroute2"))))
"""


def test_a_worker_imports_nothing_the_fork_server_did_not(tmp_path: Path, lab_name: str) -> None:
    """WORKER_PRELOAD holds what a lab imports on first use (here ebtables': pyroute2's IPRoute, Scapy's layers,
    expectation kinds), so no worker of ``run -j`` pays for those imports again."""
    lab = tmp_path / f"{lab_name}.yaml"
    lab.write_text((REPO / "labs" / "ebtables.yaml").read_text().replace("name: ebtables\n", f"name: {lab_name}\n", 1))
    shown = subprocess.run(
        [sys.executable, "-c", PRELOAD_PROBE, str(lab)], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert shown.stdout.strip() == ""


ORDERING_PROBE = """\
import sys
from labctl.verify import parallel, report, scope
files = scope.lab_files(["labs"])
order = sorted(files, key=lambda f: parallel._sort_key(f, None, {}))
assert order[0].endswith("rx-backlog.yaml"), order[:3]
heavy = ("labctl.verify.runner", "labctl.verify.stage", "iptc", "pyroute2")
print(" ".join(m for m in heavy if m in sys.modules))
"""


def test_run_j_orders_its_labs_without_the_code_that_runs_them() -> None:
    """labctl's own process in ``run -j`` loads every lab file to order them, then waits and reports: it does not
    import what runs a check (the runner, python-iptables: 0.35 s, spent at the start beside the fork server's
    own imports, which every lab waits for)."""
    shown = subprocess.run(
        [sys.executable, "-c", ORDERING_PROBE], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert shown.stdout.strip() == ""


BURN = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass')"


def test_run_j_accounts_for_the_cpu_of_its_labs(tmp_path: Path, lab_name: str) -> None:
    """What ``time labctl run -j`` (and the benchmark) reports includes every lab's work: the fork server is
    killed at the end (not unwound), and only after it has reaped each worker."""
    files = []
    for suffix in ("a", "b"):
        check = (
            "  - name: burns\n    traffic:\n"
            f'      - exec: {{node: client, cmd: ["{sys.executable}", "-c", "{BURN}"], exit: 0}}\n'
        )
        file = tmp_path / f"{lab_name}{suffix}.yaml"
        file.write_text(f"name: {lab_name}{suffix}\n{TWO_NODES}checks:\n{check}")
        files.append(str(file))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [str(Path(sys.executable).with_name("labctl")), "run", "-j", "2", "--json", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr + out.stdout
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert used >= 1.2, used  # the two programs' 0.6 s each, besides labctl's own


def _fork_servers() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if b"multiprocessing.forkserver" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
    return found


def test_run_j_starts_its_fork_server_first_and_never_leaves_it_behind(tmp_path: Path, lab_name: str) -> None:
    """``run -j`` starts the fork server before its own imports (so its second of imports runs beside them); a run
    that then stops -- a broken argument, no lab files -- stops the server too."""
    labctl = str(Path(sys.executable).with_name("labctl"))
    before = _fork_servers()
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["-j", "0", str(empty), str(empty)], ["-j", "2", str(empty)]):
        out = subprocess.run([labctl, "run", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
    files = [_lab(tmp_path, f"{lab_name}s", 1), _lab(tmp_path, f"{lab_name}t", 1)]
    ran = subprocess.run([labctl, "run", "-j", "2", *files], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert _fork_servers() - before == set()
