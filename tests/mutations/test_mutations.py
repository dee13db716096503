"""Every check in labs/ turns red when its claim is made false (tests/mutations/catalogue.yaml).

Per lab file: (a) every check has a mutation, (b) every mutation applies to the
check as written and the mutated lab is a valid lab file, (c) every mutation
kills -- its check FAILs or ERRORs on the kernel.  Mutations marked
``known_survivor`` are strict xfails, one test each: when the engine learns to
kill one, its test XPASSes, which fails the suite until the marker is removed.
"""

from __future__ import annotations

import pytest

from labctl.verify.mutation import Mutation, MutationError, mutated_lab_data, read_lab_data, validate
from tests.mutations.conftest import LABS, MutationRuns, catalogue, lab_files

CATALOGUE = catalogue()
CATALOGUE_NAME = "tests/mutations/catalogue.yaml"
LAB_FILES = lab_files()


def test_catalogue_names_only_existing_labs() -> None:
    stale = sorted(set(CATALOGUE.labs) - set(LAB_FILES))
    assert stale == [], f"the catalogue has mutations for lab files that are gone: {stale}"


@pytest.mark.parametrize("lab_file", LAB_FILES)
def test_every_check_has_a_mutation(lab_file: str) -> None:
    data = read_lab_data(str(LABS / lab_file))
    checks = [c["name"] for c in data.get("checks") or []]
    group = CATALOGUE.labs.get(lab_file)
    covered = {name for name, specs in group.checks.items() if specs} if group else set()
    missing = [name for name in checks if name not in covered]
    assert missing == [], f"{lab_file}: checks without a mutation in {CATALOGUE_NAME}: {missing}"
    if group is not None:
        gone = sorted((set(group.checks) | set(group.fresh)) - set(checks))
        assert gone == [], f"{lab_file}: the catalogue names checks the lab no longer has: {gone}"


@pytest.mark.parametrize("lab_file", LAB_FILES)
def test_every_mutation_applies_and_validates(lab_file: str) -> None:
    group = CATALOGUE.labs.get(lab_file)
    if group is None:
        pytest.skip("no mutations (test_every_check_has_a_mutation fails)")
    data = read_lab_data(str(LABS / lab_file))
    problems = []
    for mutation in group.mutations():
        try:
            validate(mutated_lab_data(data, mutation), lab_file)
        except MutationError as exc:
            problems.append(f"- {mutation.check}: {mutation.label()} ({mutation.why}):\n    {exc}")
    assert not problems, "stale or invalid mutations (update the catalogue):\n" + "\n".join(problems)


@pytest.mark.parametrize("lab_file", LAB_FILES)
def test_every_mutation_kills(lab_file: str, mutation_runs: MutationRuns) -> None:
    """All mutations but the known survivors (tested one by one below) turn their check red."""
    if lab_file not in CATALOGUE.labs:
        pytest.skip("no mutations (test_every_check_has_a_mutation fails)")
    run = mutation_runs.get(lab_file)
    assert run.error is None, f"{lab_file}: the mutations could not run: {run.error}"
    survived = [r for r in run.results if r.outcome == "survived" and r.mutation.known_survivor is None]
    # skipped: the check requires a kernel option this kernel lacks -- not provable here, not a failure
    other = [r for r in run.results if r.outcome not in ("killed", "survived", "skipped")]
    lines = []
    if survived:
        lines.append(f"{len(survived)} mutation(s) still PASS -- the check proves less than it claims:")
        lines += [f"  - {r.mutation.check}: {r.mutation.label()} -- {r.mutation.why}" for r in survived]
    if other:
        lines.append(f"{len(other)} mutation(s) could not be judged:")
        lines += [f"  - {r.line()}" for r in other]
    assert not lines, f"{lab_file} ({run.seconds:.1f} s):\n" + "\n".join(lines)


def _known_survivors() -> list[object]:
    params = []
    for lab_file, group in CATALOGUE.labs.items():
        for index, mutation in enumerate(group.mutations()):
            if mutation.known_survivor is not None:
                params.append(
                    pytest.param(
                        lab_file,
                        index,
                        id=f"{lab_file}:{mutation.check}:{mutation.label()}",
                        marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=mutation.known_survivor),
                    )
                )
    return params


@pytest.mark.parametrize(("lab_file", "index"), _known_survivors())
def test_known_survivor(lab_file: str, index: int, mutation_runs: MutationRuns) -> None:
    """Expected to fail today; once it passes (the mutation kills), remove its known_survivor."""
    run = mutation_runs.get(lab_file)
    assert run.error is None, f"{lab_file}: the mutations could not run: {run.error}"
    result = run.results[index]
    mutation: Mutation = result.mutation
    if result.outcome == "skipped":
        pytest.skip(result.detail)
    if result.outcome not in ("killed", "survived"):
        # not an AssertionError, so the xfail (raises=AssertionError) does not swallow it
        pytest.fail(f"not judged: {result.line()}", pytrace=False)
    assert result.killed, f"{mutation.check}: {mutation.label()} still PASSes -- {mutation.why}"
