"""labctl's Typer application: one sub-command per user action."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from labctl.cli import coercion, render
from labctl.cli.common import console, lab_name, plain, print_json, reports_errors, require_root, say
from labctl.errors import LabFileError, Problem

coercion.install()  # plain str/int/bool/Path arguments without importing pydantic

app = typer.Typer(
    name="labctl",
    help="Build Linux network labs on the real kernel and prove how packets travel through it.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion; `labctl completion SHELL` prints the script
    pretty_exceptions_enable=False,
    # plain help and usage errors: Rich's help renderer costs more than all of ``labctl --help`` may (0.15 s)
    rich_markup_mode=None,
)

LabArg = Annotated[str, typer.Argument(help="lab name, or the lab file that defines it")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _print_version(value: bool) -> None:
    if value:
        from labctl import __version__

        print(f"labctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print labctl's version and exit")
    ] = False,
) -> None:
    """Build Linux network labs on the real kernel and prove how packets travel through it."""


@app.command()
@reports_errors
def up(file: Annotated[Path, typer.Argument(help="lab file (YAML)")]) -> None:
    """Build the lab in FILE, or converge a running one to it."""
    from labctl.cli.progress import building
    from labctl.lab import build
    from labctl.lab.labfile import load_lab

    topo, _ = load_lab(str(file))
    require_root()
    changes: list[str] = []
    with building(topo.name) as step:
        result = build.up(topo, str(file), progress=step, changes=changes)
    for line in changes:
        plain(f"  {line}")
    say(f"lab [bold]{result.name}[/] is up: {len(result.nodes)} nodes, {len(topo.links)} links")


@app.command()
@reports_errors
def down(lab: LabArg) -> None:
    """Remove everything the lab made (works after a crash too)."""
    from labctl.errors import LabNotUpError
    from labctl.lab import teardown  # not build: down needs none of the build's steps
    from labctl.lab.clean import anything_left_of

    require_root()
    name = lab_name(lab)
    known = anything_left_of(name)
    removed = teardown.down(name)  # also when unknown: it takes and removes a lock file a killed up left
    if not known:
        from labctl.lab.status import running_labs  # status reads links: only this error needs the list

        raise LabNotUpError(f"lab {name} is not up (labs up: {', '.join(running_labs()) or 'none'})")
    say(f"lab [bold]{name}[/] is down ({len(removed)} namespaces removed)")


@app.command()
@reports_errors
def status(
    lab: Annotated[str | None, typer.Argument(help="lab name (all labs when omitted)")] = None,
    json: JsonOpt = False,
    every: Annotated[
        bool,
        typer.Option("--all", help=f"the full table past {render.SUMMARY_ABOVE} nodes too (larger labs: a summary)"),
    ] = False,
    node: Annotated[
        list[str] | None,
        typer.Option("--node", "-n", metavar="NODE", help="only this node, in full (repeat for more); needs LAB"),
    ] = None,
) -> None:
    """Nodes, interfaces, addresses, bridge ports and routes as the kernel has them."""
    from labctl.lab.status import lab_status, running_labs

    require_root()
    if node and not lab:
        raise typer.BadParameter("--node needs a LAB", param_hint="--node")
    labs = [lab_name(lab)] if lab else running_labs()
    data = [lab_status(name, node or None) for name in labs]
    if json:
        print_json(data)  # one shape whatever the arguments: a list of labs
        return
    if not data:
        console.print("no labs are up")
    for item in data:
        render.status(item, full=every or bool(node))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@reports_errors
def exec(
    lab: LabArg,
    node: Annotated[str, typer.Argument(help="node name")],
    command: Annotated[list[str], typer.Argument(help="command to run inside the node")],
) -> None:
    """Run a command inside a node (like ip netns exec), e.g. labctl exec LAB c1 -- ping -c1 192.168.9.3."""
    from labctl.errors import CommandError, LabNotUpError
    from labctl.kernel import netns
    from labctl.kernel.sysfs import enter_with_own_sysfs

    require_root()
    lab = lab_name(lab)
    name = netns.namespace_name(lab, node)
    if not netns.exists(name):
        if not netns.list_labctl(lab):
            from labctl.lab.status import running_labs

            raise LabNotUpError(f"lab {lab} is not up (labs up: {', '.join(running_labs()) or 'none'})")
        raise LabNotUpError(f"lab {lab} has no node {node} up")
    enter_with_own_sysfs(name)
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:  # 127 and 126 as env(1), nice(1) and ip netns exec's shell give them
        raise CommandError(f"{command[0]}: command not found", 127) from None
    except PermissionError:
        raise CommandError(f"{command[0]}: permission denied", 126) from None


@app.command()
@reports_errors
def clean(
    lab: Annotated[str | None, typer.Option("--lab", help="only this lab's leftovers")] = None,
) -> None:
    """Remove every labctl leftover: namespaces, relays, trace instances, global sysctls."""
    from labctl.lab.clean import clean_all

    require_root()
    done = clean_all(lab)
    render.cleaned(done)


@app.command()
@reports_errors
def graph(
    file: Annotated[Path, typer.Argument(help="lab file (YAML)")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help=".svg/.png (Graphviz), .dot or .mmd")] = None,
    fmt: Annotated[str, typer.Option("--format", help="dot or mermaid (when printing)")] = "dot",
) -> None:
    """Draw the topology (Graphviz or Mermaid)."""
    from labctl.errors import KernelLacksError
    from labctl.lab.labfile import load_lab
    from labctl.topology import graph as topo_graph
    from labctl.topology.loader import load_file
    from labctl.topology.model import LabFile

    try:
        topo, _ = load_lab(str(file))
    except KernelLacksError:  # a picture needs no kernel: a lab for another kernel is drawn all the same
        topo = load_file(str(file), LabFile)[0]
    if output is None:
        print(topo_graph.mermaid(topo) if fmt == "mermaid" else topo_graph.dot(topo))
        return
    topo_graph.write(topo, str(output))
    console.print(f"wrote {output}")


@app.command()
@reports_errors
def run(
    paths: Annotated[list[str], typer.Argument(help="lab files or folders of lab files")],
    json: JsonOpt = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="write a JUnit XML report")] = None,
    select: Annotated[str | None, typer.Option("-k", help="only checks whose name or claim id contains this")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="leave the labs up afterwards")] = False,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="run against a lab already up (labctl up) and leave it up")
    ] = False,
    kernel: Annotated[
        list[str] | None,
        typer.Option("--kernel", help="host, 6.1 (Debian 12's kernel in a QEMU VM), 6.12 (bookworm-backports') "
                     "or a bzImage; repeat for a verdict table across kernels"),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="write a self-contained HTML report (path pictures, pcaps beside it)")
    ] = None,
    pcap_dir: Annotated[
        Path | None, typer.Option("--pcap", help="write each check's captures to DIR/LAB.CHECK.pcapng, with verdicts")
    ] = None,
    jobs_given: Annotated[
        str,
        typer.Option("-j", "--jobs", help="labs at a time, each in its own process (some run alone); auto: 3 per core"),
    ] = "1",
) -> None:
    """Bring each lab up, run its checks, bring it down; exit 0 only if every check passed."""
    from labctl.verify.workers import fork_server_started

    # run -j over several labs: the fork server's second of imports runs beside this process's own start-up
    several = len(paths) > 1 or any(Path(p).is_dir() for p in paths)
    with fork_server_started(jobs_given != "1" and not kernel and several):
        from labctl.verify import report
        from labctl.verify.scope import lab_files

        files = lab_files(paths)
        if not files:
            raise typer.BadParameter(f"no lab files in {' '.join(paths)}")
        from labctl.verify.parallel import parse_jobs

        try:
            jobs = parse_jobs(jobs_given, len(files))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="-j") from exc
        if kernel:
            from labctl.cli.vm import run_on_kernels

            if html is not None or pcap_dir is not None:
                raise typer.BadParameter(
                    "the HTML report and pcaps come from this host's evidence: with --kernel use --json or --junit"
                )
            if jobs > 1:
                raise typer.BadParameter("--kernel runs each kernel's labs one after another: leave out -j")

            run_on_kernels(files, kernel, json, junit, select, keep, reuse)
            return
        require_root()
        from labctl.cli.progress import checking

        pcaps_to = str(pcap_dir) if pcap_dir else None
        observations = json or junit is not None  # the checks' evidence as data: only these reports print it
        with checking(files, select, enabled=not json and jobs <= 1) as show:
            if jobs > 1 and len(files) > 1:  # labctl/verify/parallel.py: which labs may share the machine
                from labctl.verify.parallel import run_labs as run_in_parallel

                results, bad_input = run_in_parallel(
                    files,
                    jobs,
                    select,
                    keep,
                    reuse,
                    pcap_dir=pcaps_to,
                    evidence=html is not None,
                    observations=observations,
                )
            else:
                from labctl.verify.runner import run_labs  # not for -j: the workers run the labs, this process reports

                results, bad_input = run_labs(
                    files,
                    select=select,
                    keep=keep,
                    on_check=show,
                    reuse=reuse,
                    pcap_dir=pcaps_to,
                    observations=observations,
                )
        if not any(r.checks or r.error for r in results):

            what = f"no check matches -k {select!r}" if select else "these lab files have no checks"
            raise LabFileError([Problem((), what, " ".join(files))])
        if junit is not None:
            junit.write_text(report.as_junit(results))
        if json:
            print(report.as_json(results))
        else:
            report.print_results(console, results)
            pcaps = [c.pcap for r in results for c in r.checks if c.pcap]
            if pcaps:
                console.print(f"{len(pcaps)} pcapng files (verdicts as frame comments) in {pcap_dir}", highlight=False)
        if html is not None:
            from labctl.verify.html import write_report

            written = write_report(html, results)
            if not json:
                console.print(f"wrote {written}", highlight=False)
        if bad_input:
            raise typer.Exit(2)
        if not all(r.passed for r in results):
            raise typer.Exit(1)


@app.command()
@reports_errors
def demo(folder: Annotated[Path, typer.Argument(help="folder of lab files")] = Path("labs")) -> None:
    """The main job: run every verification lab in FOLDER and show the kernel's evidence."""
    run([str(folder)], json=False, junit=None, select=None, keep=False, reuse=False, kernel=None, html=None)


def _register_command_groups() -> None:
    """Commands that live in their own modules (one module per area of the CLI)."""
    from labctl.cli.netfilter import register as register_netfilter
    from labctl.cli.tooling import register as register_tooling
    from labctl.cli.trace import register as register_trace
    from labctl.cli.traffic import register as register_traffic
    from labctl.cli.vm import register as register_vm

    register_traffic(app)
    register_trace(app)
    register_netfilter(app)
    register_tooling(app)
    register_vm(app)


_register_command_groups()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _function_name(function: object) -> str:
    return str(getattr(function, "__name__", ""))


def _only_the_command_asked_for(argv: list[str]) -> typer.Typer:
    """``app`` with only the command named in ``argv``, when it names one.

    Typer turns every registered function into a click command (reading each
    one's annotations) before it parses anything: a third of a command's
    start-up.  ``labctl up FILE`` needs only ``up``; the help, an unknown
    command and anything that is not a command name get the whole app.
    """
    import copy

    from typer.main import get_command_name

    asked = argv[1] if len(argv) > 1 else ""
    if not asked or asked.startswith("-"):
        return app
    commands = [c for c in app.registered_commands if get_command_name(c.name or _function_name(c.callback)) == asked]
    groups = [g for g in app.registered_groups if g.name == asked]
    if not commands and not groups:
        return app
    trimmed = copy.copy(app)
    trimmed.registered_commands = commands
    trimmed.registered_groups = groups
    return trimmed


def main() -> None:
    import signal

    # SIGTERM (timeout, systemd, CI) unwinds like Ctrl-C, so trace instances,
    # captures and half-built labs are cleaned up by their context managers
    signal.signal(signal.SIGTERM, _interrupt)
    from labctl.cli.tooling import COMPLETE_VAR, complete

    if os.environ.get(COMPLETE_VAR):
        complete(app)  # the shell asks what may follow on its command line; exits
    if os.geteuid() == 0 and len(sys.argv) > 1 and sys.argv[1] not in ("--help", "--version", "validate", "generate"):
        import contextlib

        from labctl.lab.clean import reclaim_dead_owners

        with contextlib.suppress(Exception):  # trace instances and scratch namespaces of killed labctl processes
            reclaim_dead_owners()
    _only_the_command_asked_for(sys.argv)()
