"""The commands around the lab rather than in it: validate, generate, completion.

They are what a newcomer reaches for first (is my file right? give me a
topology to start from, complete my lab names), so they must be quick: only
typer is imported here, everything else inside the command that needs it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from labctl.cli.common import err_console, print_json, reports_errors

if TYPE_CHECKING:
    from labctl.errors import Problem

COMPLETE_VAR = "_LABCTL_COMPLETE"
"""The environment variable the completion scripts set when they ask labctl for candidates."""
STDIN = "-"


# ---------------------------------------------------------------- validate


def _expand(paths: list[str]) -> list[str]:
    """Folders stand for the lab files in them, as for ``labctl run``; ``-`` is standard input."""
    files: list[str] = []
    for path in paths:
        if path != STDIN and os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            files += found or [path]  # an empty folder is reported by the loader ("not a regular file")
        else:
            files.append(path)
    return files


@contextlib.contextmanager
def _readable(path: str) -> Iterator[str]:
    """A regular file the loader can open: ``-`` is copied from stdin to a private temporary file.

    The loader refuses pipes on purpose (a FIFO could block it forever), so
    standard input is read here, once, with the loader's own size cap.
    """
    if path != STDIN:
        yield path
        return
    from labctl.topology.loader import MAX_FILE_BYTES

    data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    with tempfile.TemporaryDirectory(prefix="labctl-validate-") as tmp:
        file = os.path.join(tmp, "stdin.yaml")  # a lab without 'name' is named 'stdin'
        with open(file, "wb") as f:
            f.write(data)
        yield file


def _problem_dict(problem: Problem) -> dict[str, Any]:
    from labctl.errors import format_key

    return {"file": problem.file, "line": problem.line, "key": format_key(problem.path), "message": problem.message}


def validate_one(path: str) -> tuple[dict[str, Any], int]:
    """Load ``path`` exactly as ``up`` does and describe the outcome; the exit code it deserves comes second."""
    from labctl.errors import LabctlError, LabFileError, Problem
    from labctl.lab.labfile import load_lab

    shown = "<stdin>" if path == STDIN else path
    result: dict[str, Any] = {"file": shown, "ok": False, "lab": None, "problems": []}
    with _readable(path) as file:
        try:
            lab, _ = load_lab(file)
        except LabFileError as exc:
            problems = exc.problems
            code = 2
        except LabctlError as exc:  # the machine could not judge it (no tracefs, say): not the file's fault
            problems = [Problem((), str(exc), shown)]
            code = exc.exit_code
        else:
            result.update(ok=True, lab=lab.name, nodes=len(lab.nodes), links=len(lab.links), checks=len(lab.checks))
            return result, 0
    for problem in problems:
        if problem.file in (None, file):
            problem.file = shown
    result["problems"] = [_problem_dict(p) for p in problems]
    return result, code


def validate(
    files: Annotated[list[str], typer.Argument(help="lab files, folders of lab files, or - for standard input")],
    json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check lab files with the loader `up` uses, building nothing; print every problem as file:line: key: message.

    Exit 0 when every file is valid, 2 when one is not.
    """
    from labctl.errors import problem_text

    results = []
    code = 0
    for path in _expand(files):
        result, rc = validate_one(path)
        results.append(result)
        code = max(code, rc)
    if json:
        print_json(results)
    else:
        for result in results:
            if result["ok"]:
                what = f"{result['nodes']} nodes, {result['links']} links, {result['checks']} checks"
                print(f"{result['file']}: ok (lab {result['lab']}: {what})")
            for p in result["problems"]:
                where = p["file"] + (f":{p['line']}" if p["line"] is not None else "")
                print(problem_text(where, p["key"], p["message"]))  # escaped: the file is anyone's
        bad = sum(not r["ok"] for r in results)
        if bad and len(results) > 1:
            err_console.print(f"{bad} of {len(results)} files have problems", highlight=False, soft_wrap=True)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------- generate

generate_app = typer.Typer(
    help="Write a lab file of a usual shape (star, linear, tree, clos) with every address assigned.",
    no_args_is_help=True,
)

OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="write the lab file here (default: stdout)")]
NameOpt = Annotated[str | None, typer.Option("--name", help="lab name (default: the output file's name, or the shape)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite an existing output file")]


def _emit(make: Callable[[str], dict[str, Any]], shape: str, command: str, output: Path | None, name: str | None,
          force: bool) -> None:
    """Build, check with the same model a lab file is parsed into, then write: an invalid file is never written."""
    from labctl.errors import LabctlError, LabFileError
    from labctl.topology.generate import to_yaml
    from labctl.topology.loader import default_name, parse_model, read_yaml
    from labctl.topology.model import LabFile

    if name is None:
        name = default_name(str(output)) if output is not None else shape
    text = to_yaml(make(name), command)
    shown = str(output) if output is not None else "<generated>"
    data, source = read_yaml(text, shown)
    try:
        parse_model(data, source, LabFile)
    except LabFileError as exc:  # a name the user gave may be refused here; anything else is labctl's bug
        raise LabctlError(f"labctl generated an invalid lab file:\n{exc}") from None
    if output is None:
        sys.stdout.write(text)
        return
    if output.exists() and not force:
        raise _exists(output)
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LabctlError(f"cannot write {output}: {exc.strerror}") from None
    lab = data["topology"]
    err_console.print(
        f"wrote {output}: lab {name}, {len(lab['nodes'])} nodes, {len(lab['links'])} links"
        f" (labctl up {output}; labctl run {output} pings end to end)",
        highlight=False,
        soft_wrap=True,
    )


def _exists(output: Path) -> Exception:
    from labctl.errors import LabFileError, Problem

    return LabFileError([Problem((), "the file exists; use --force to overwrite it", str(output))])


@generate_app.command()
@reports_errors
def star(
    hosts: Annotated[int, typer.Option("--hosts", help="number of hosts on the switch")] = 3,
    output: OutputOpt = None,
    name: NameOpt = None,
    force: ForceOpt = False,
) -> None:
    """One switch node (a Linux bridge) and N hosts in one subnet (Mininet's single,N)."""
    from labctl.topology import generate

    _emit(lambda n: generate.star(hosts, name=n), "star", f"labctl generate star --hosts {hosts}", output, name, force)


@generate_app.command()
@reports_errors
def linear(
    routers: Annotated[int, typer.Option("--routers", help="number of routers between the two hosts")] = 3,
    output: OutputOpt = None,
    name: NameOpt = None,
    force: ForceOpt = False,
) -> None:
    """h1 - r1 - ... - rN - h2, one subnet per link, static routes so the ends reach each other."""
    from labctl.topology import generate

    _emit(lambda n: generate.linear(routers, name=n), "linear", f"labctl generate linear --routers {routers}", output,
          name, force)


@generate_app.command()
@reports_errors
def tree(
    depth: Annotated[int, typer.Option("--depth", help="levels of switches")] = 2,
    fanout: Annotated[int, typer.Option("--fanout", help="children of every switch")] = 2,
    output: OutputOpt = None,
    name: NameOpt = None,
    force: ForceOpt = False,
) -> None:
    """A tree of switches (Linux bridges) with hosts at the leaves, one subnet (Mininet's tree,depth,fanout)."""
    from labctl.topology import generate

    _emit(lambda n: generate.tree(depth, fanout, name=n), "tree",
          f"labctl generate tree --depth {depth} --fanout {fanout}", output, name, force)


@generate_app.command()
@reports_errors
def clos(
    spines: Annotated[int, typer.Option("--spines", help="number of spine routers")] = 2,
    leaves: Annotated[int, typer.Option("--leaves", help="number of leaf routers")] = 4,
    hosts_per_leaf: Annotated[int, typer.Option("--hosts-per-leaf", help="hosts behind each leaf")] = 2,
    output: OutputOpt = None,
    name: NameOpt = None,
    force: ForceOpt = False,
) -> None:
    """A leaf-spine fabric: every leaf routed to every spine, hosts on a bridge in their leaf, static routes."""
    from labctl.topology import generate

    command = f"labctl generate clos --spines {spines} --leaves {leaves} --hosts-per-leaf {hosts_per_leaf}"
    _emit(lambda n: generate.clos(spines, leaves, hosts_per_leaf, name=n), "clos", command, output, name, force)


# ---------------------------------------------------------------- completion


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


_INSTALL_HINTS = {
    "bash": 'eval "$(labctl completion bash)"  # in ~/.bashrc; or > /etc/bash_completion.d/labctl',
    "zsh": 'labctl completion zsh > "${fpath[1]}/_labctl"  # then restart zsh (compinit loads it)',
    "fish": "labctl completion fish > ~/.config/fish/completions/labctl.fish",
}


def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish")]) -> None:
    """Print the shell completion script: commands, options, lab names and node names of running labs.

    bash: eval "$(labctl completion bash)"; zsh: labctl completion zsh > "${fpath[1]}/_labctl";
    fish: labctl completion fish > ~/.config/fish/completions/labctl.fish
    """
    from typer.completion import get_completion_script

    print(get_completion_script(prog_name="labctl", complete_var=COMPLETE_VAR, shell=shell.value))
    if sys.stdout.isatty():
        err_console.print(f"# install: {_INSTALL_HINTS[shell.value]}", highlight=False)


def lab_names(incomplete: str) -> list[str]:
    """Labs with state under /run/labctl (nothing when it cannot be read, e.g. not root)."""
    from labctl.lab.state import known_labs

    try:
        return [name for name in known_labs() if name.startswith(incomplete)]
    except OSError:
        return []


def _lab_file_interfaces(file: str, node: str) -> list[str]:
    """Interface names of ``node`` from the lab's file (links and bridges), read without validating it."""
    from labctl.errors import LabctlError
    from labctl.topology.loader import read_lab_text, read_yaml

    try:
        data, _ = read_yaml(read_lab_text(file), file)
        topo = data["topology"]
        names = set(topo["nodes"][node].get("bridges") or {})
        for link in topo.get("links") or []:
            for end in link["endpoints"]:
                owner, _, ifname = str(end).partition(":")
                if owner == node:
                    names.add(ifname)
    except (LabctlError, KeyError, TypeError, AttributeError):
        return []
    return sorted(names)


def node_names(lab: str | None, incomplete: str) -> list[str]:
    """Nodes of ``lab`` from its state; after ``NODE:`` the node's interfaces from the lab's file."""
    from labctl.errors import LabctlError
    from labctl.lab import state

    if not lab:
        return []
    try:
        from labctl.cli.common import lab_name

        current = state.load(lab_name(lab))
    except (LabctlError, OSError, TypeError):
        return []
    if current is None:
        return []
    node, colon, _ = incomplete.partition(":")
    if colon and node in current.nodes:
        return [f"{node}:{i}" for i in _lab_file_interfaces(current.file, node) if f"{node}:{i}".startswith(incomplete)]
    return [name for name in sorted(current.nodes) if name.startswith(incomplete)]


LAB_PARAMS = frozenset({"lab"})
NODE_PARAMS = frozenset({"node", "target"})
"""Parameter names that mean a lab (``LAB|FILE``, ``--lab``) or one of its nodes (``NODE``, ``NODE[:IFACE]``)."""


def _completion_item(value: str) -> Any:
    try:
        from typer._click.shell_completion import CompletionItem  # Typer >= 0.20 carries its own click
    except ImportError:  # pragma: no cover - older Typer on the real click
        from click.shell_completion import CompletionItem  # type: ignore[no-redef]
    return CompletionItem(value)


def _attach(param: Any) -> None:
    """Give a lab or node parameter of any command its candidates (commands live in several modules)."""
    if param.name in LAB_PARAMS:

        def labs(ctx: Any, incomplete: str) -> list[Any]:
            return [_completion_item(n) for n in lab_names(incomplete)]

        param.shell_complete = labs
    elif param.name in NODE_PARAMS:

        def nodes(ctx: Any, incomplete: str) -> list[Any]:
            return [_completion_item(n) for n in node_names(ctx.params.get("lab"), incomplete)]

        param.shell_complete = nodes


def _walk(command: Any) -> Iterator[Any]:
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from _walk(sub)


def complete(app: typer.Typer) -> None:
    """Answer the shell's completion request (``_LABCTL_COMPLETE`` is set) and exit.

    Typer completes commands and options by itself; lab and node arguments
    get their candidates here, by parameter name, so every command that takes
    a LAB or a NODE completes them without each module wiring it up.
    """
    command = typer.main.get_command(app)
    for cmd in _walk(command):
        for param in cmd.params:
            _attach(param)
    strip = _join_bash_colon() if os.environ.get(COMPLETE_VAR) == "complete_bash" else ""
    if not strip:
        command.main(prog_name="labctl", complete_var=COMPLETE_VAR)
        raise SystemExit(0)  # pragma: no cover - main() exits when answering a completion request
    import io

    answer = io.StringIO()
    with contextlib.redirect_stdout(answer), contextlib.suppress(SystemExit):
        command.main(prog_name="labctl", complete_var=COMPLETE_VAR)
    # bash replaces only the word after the ':', so it gets back only that part of each candidate
    print("\n".join(line.removeprefix(strip) for line in answer.getvalue().splitlines() if line.startswith(strip)))
    raise SystemExit(0)


def _join_bash_colon() -> str:
    """Undo bash splitting ``NODE:IFACE`` at ':' (it is in COMP_WORDBREAKS); return the ``NODE:`` joined back.

    bash hands ``r2:e`` over as the words ``r2``, ``:``, ``e``; joined, the
    node's interfaces can be completed like in zsh and fish.
    """
    import shlex

    text = os.environ.get("COMP_WORDS", "")
    try:
        words = shlex.split(text)  # the script joins the words with newlines; Typer splits them the same way
        cword = int(os.environ.get("COMP_CWORD", ""))
    except ValueError:
        return ""
    if not 0 <= cword <= len(words):
        return ""
    current = words[cword] if cword < len(words) else ""
    if current == ":" and cword >= 1:
        start, prefix = cword - 1, words[cword - 1] + ":"
        joined = prefix
    elif cword >= 2 and words[cword - 1] == ":":
        start, prefix = cword - 2, words[cword - 2] + ":"
        joined = prefix + current
    else:
        return ""
    os.environ["COMP_WORDS"] = shlex.join([*words[:start], joined])
    os.environ["COMP_CWORD"] = str(start)
    return prefix


def register(app: typer.Typer) -> None:
    """Add validate, generate and completion to ``app``."""
    app.command(name="validate")(reports_errors(validate))
    app.add_typer(generate_app, name="generate")
    app.command(name="completion")(reports_errors(completion))
