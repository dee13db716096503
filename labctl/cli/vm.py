"""``labctl run --kernel …`` and the ``labctl vm`` commands: labs on other kernels, in a QEMU guest.

Parsing and printing only; the work is in labctl.vm.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from labctl.cli.common import console, err_console, escape, reports_errors, require_root

if TYPE_CHECKING:  # the runner and the VM code import pyroute2 and friends: only when a command runs
    from rich.console import Console  # Rich too: importing it costs a sixth of `labctl validate` (0.02 s)

    from labctl.verify.results import LabResult
    from labctl.vm import diff
    from labctl.vm.kernels import KernelRun

vm_app = typer.Typer(help="Labs on another kernel: a QEMU guest booted from a cached Debian 12 image.",
                     no_args_is_help=True)

CELLS = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]", "error": "[red]ERROR[/]", "skip": "[yellow]SKIP[/]",
         "absent": "[dim]—[/]"}
KINDS = {"differs": "[red]differs[/]", "explained": "[yellow]explained by the lab[/]", "same": "same"}


def _say(text: str) -> None:
    """What the VM part does on the way (installing QEMU, building the image, falling back to TCG): on stderr,
    so ``--json`` on stdout stays one JSON document even on the first run."""
    err_console.print(escape(text), highlight=False)


def run_on_kernels(
    files: list[str], kernel_names: list[str], json: bool, junit: Path | None, select: str | None, keep: bool,
    reuse: bool, timeout: float | None = None,
) -> None:
    """Run the labs on each kernel, report each run as ``run`` does, then the table when there are several."""
    from labctl.verify import report
    from labctl.vm import diff
    from labctl.vm import kernels as vm_kernels
    from labctl.vm.errors import VmError

    wanted = [vm_kernels.resolve(name) for name in kernel_names]
    require_root()  # the host's labs, and the image build (debootstrap) and its cache
    if (keep or reuse) and not all(k.is_host for k in wanted):
        raise typer.BadParameter("a VM powers off after its run: --keep and --reuse are for --kernel host only")
    runs: list[KernelRun] = []
    with console.status("starting", spinner="dots") as status:

        def progress(text: str) -> None:
            if not json:
                status.update(escape(text))

        for kernel in wanted:
            if kernel.is_host:
                runs.append(vm_kernels.run_host(files, select, keep, reuse, progress))
            else:
                status.update(f"{kernel.label}: image, then boot")
                try:
                    runs.append(vm_kernels.run_vm(kernel, files, select, _say, progress,
                                                  timeout or vm_kernels.DEFAULT_TIMEOUT))
                except VmError as exc:
                    if len(wanted) == 1:
                        raise
                    # one guest failing (no image, a panic before any lab) must not cost the other kernels' runs
                    runs.append(vm_kernels.failed_run(kernel, files, str(exc)))
    everything = [lab for run in runs for lab in run.results]
    several = len(runs) > 1
    rows = diff.table([(run.kernel.label, run.results) for run in runs]) if several else []
    if junit is not None:
        junit.write_text(report.as_junit(everything, by_kernel=several))
    if json:
        print(as_json(runs, rows))
    else:
        for run in runs:
            print_run(console, run)
        if several:
            print_table(console, runs, rows)
    if any(run.bad_input for run in runs):
        raise typer.Exit(2)
    if not all(lab.passed for lab in everything):
        raise typer.Exit(1)


def print_run(out: Console, run: KernelRun) -> None:
    from labctl.verify import report

    where = "this machine" if run.kernel.is_host else (
        f"VM under {run.accel.upper()}: boot {run.boot_seconds:.1f} s, labs {run.run_seconds:.1f} s, "
        f"wall {run.wall_seconds:.1f} s")
    out.print(f"[bold]== kernel {escape(run.kernel.label)}: {escape(run.release)}[/] ({where})", highlight=False,
              soft_wrap=True)
    if run.stopped:
        out.print(f"[red]the guest stopped before its run finished:[/] {escape(run.stopped)}", highlight=False,
                  soft_wrap=True)
    report.print_results(out, run.results)


def print_table(out: Console, runs: list[KernelRun], rows: list[diff.DiffRow]) -> None:
    """The table (one status word per cell, never wrapped), then why each differing row differs."""
    from rich.console import Console
    from rich.table import Table

    from labctl.vm import diff

    table = Table(title="verdict per kernel (differences first)")
    table.add_column("difference", no_wrap=True)
    table.add_column("lab", no_wrap=True)
    table.add_column("check", no_wrap=True)
    for run in runs:
        table.add_column(f"{run.kernel.label}\n{run.release}", no_wrap=True)
    for row in rows:
        cells = [CELLS[row.verdicts[run.kernel.label].status] for run in runs]
        table.add_row(KINDS[row.kind], escape(row.lab), escape(row.check), *cells)
    # a terminal wraps at its width; a log (CI) gets the whole table, never cut to 80 columns
    wide = max(out.width, 60 + sum(max(len(run.release), 6) + 3 for run in runs) + 40)
    (out if out.is_terminal else Console(file=out.file, width=wide, highlight=False)).print(table)
    for row in rows:
        if row.kind == "same":
            continue
        reasons = "; ".join(
            f"{label} {verdict.status.upper()}" + (f" ({verdict.reason})" if verdict.reason else "")
            for label, verdict in row.verdicts.items()
        )
        out.print(f"  {KINDS[row.kind]} {escape(row.lab)}/{escape(row.check)}: {escape(reasons)}", highlight=False,
                  soft_wrap=True)
    counted = diff.counts(rows)
    out.print(f"{counted['differs']} differ, {counted['explained']} explained by the labs, {counted['same']} the same")


def as_json(runs: list[KernelRun], rows: list[diff.DiffRow]) -> str:
    """One run: run's own shape ({labs, claims}) plus ``kernels``; several: claims per kernel and the diff."""
    labs = [lab.as_dict() for run in runs for lab in run.results]
    if len(runs) == 1:
        claims = _claims(runs[0].results)
        return jsonlib.dumps({"labs": labs, "claims": claims, "kernels": [runs[0].as_dict()]}, indent=2, default=str)
    return jsonlib.dumps(
        {
            "kernels": [run.as_dict() for run in runs],
            "labs": labs,
            "claims": {run.kernel.label: _claims(run.results) for run in runs},
            "diff": [row.as_dict() for row in rows],
        },
        indent=2,
        default=str,
    )


def _claims(results: list[LabResult]) -> dict[str, object]:
    from labctl.verify import report

    verdicts = report.claims(results)
    return {"proven": verdicts.proven, "failed": verdicts.failed, "not_provable": verdicts.not_provable}


KERNEL_HELP = "6.1 (Debian 12's kernel), 6.12 (bookworm-backports') or a path to a bzImage"


@vm_app.command()
@reports_errors
def shell(
    kernel: Annotated[str, typer.Option("--kernel", help=KERNEL_HELP)] = "6.1",
    paths: Annotated[list[str] | None, typer.Argument(help="lab files or folders to put in the guest")] = None,
) -> None:
    """A shell in the guest (labctl on PATH, the lab files in the working folder); exit powers it off."""
    from labctl.verify.scope import lab_files
    from labctl.vm import kernels as vm_kernels

    require_root()
    chosen = vm_kernels.resolve(kernel)
    if chosen.is_host:
        raise typer.BadParameter("the host kernel is this machine: no VM needed", param_hint="--kernel")
    files = lab_files(paths or (["labs"] if Path("labs").is_dir() else []))
    vm_kernels.boot(chosen, files, None, "shell", _say)


@vm_app.command(name="exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@reports_errors
def exec_(
    command: Annotated[list[str], typer.Argument(help="command to run in the guest, e.g. -- labctl validate labs/")],
    kernel: Annotated[str, typer.Option("--kernel", help=KERNEL_HELP)] = "6.1",
    paths: Annotated[list[str] | None, typer.Option("--lab", help="lab files or folders to put in the guest")] = None,
) -> None:
    """Run one command in the guest (labctl on PATH, labs/ in its working folder); its output and exit status
    come back through the result disk (for scripts and CI; `vm shell` is the interactive form)."""
    import sys

    from labctl.verify.scope import lab_files
    from labctl.vm import kernels as vm_kernels

    require_root()
    chosen = vm_kernels.resolve(kernel)
    files = lab_files(paths or (["labs"] if Path("labs").is_dir() else []))
    payload, _, _ = vm_kernels.boot(chosen, files, None, "run", _say, command=command)
    done = payload.get("exec") or {"returncode": 1, "stdout": "", "stderr": str(payload.get("error"))}
    sys.stdout.write(done["stdout"])
    sys.stderr.write(done["stderr"])
    raise typer.Exit(done["returncode"])


@vm_app.command()
@reports_errors
def build() -> None:
    """Build the guest image now (otherwise the first VM run does), and say where it is and what it took."""
    from labctl.vm import image

    require_root()
    built = image.ensure(_say)
    releases = ", ".join(f"{name}: {kernel.release}" for name, kernel in built.kernels.items())
    console.print(f"image {built.directory} (kernels {releases}; built in {built.build_seconds:.0f} s)")


@vm_app.command()
@reports_errors
def info(json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """The image this labctl's recipe wants, whether it is built, and the accelerator QEMU will use."""
    from labctl.vm import image

    built = image.load()
    data = {
        "recipe": image.recipe_hash(),
        "directory": str(image.image_dir()),
        "built": built is not None,
        "kernels": {name: kernel.release for name, kernel in built.kernels.items()} if built else None,
        "build_seconds": built.build_seconds if built else None,
    }
    accel = image.CACHE / "accel.json"
    data["kvm"] = jsonlib.loads(accel.read_text()) if accel.exists() else {}
    if json:
        print(jsonlib.dumps(data, indent=2))
        return
    for key, value in data.items():
        console.print(f"{key}: {escape(str(value))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(vm_app, name="vm")
