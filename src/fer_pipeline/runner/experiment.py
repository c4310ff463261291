"""What a run leaves for the team: a DVC experiment (params, dvc.lock, metrics, reports) and,
from a clone that is deleted after the run, its outputs on the DVC remote and its experiment
on the git remote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fer_pipeline.errors import FerError
from fer_pipeline.runner.project import dvc, git


def save_experiment(root: str | Path, name: str) -> str:
    """`dvc exp save -n NAME`: the workspace (params, dvc.lock, metrics) as a DVC experiment;
    a FerError with DVC's reason when it cannot (e.g. an output of a stage the run did not run
    and no cache holds).

    One at a time per git repository: run copies are worktrees of one repository, and two
    `dvc exp save` at once race on its shared experiment refs (seen: one experiment saved
    without its run's params)."""
    import fcntl

    common = Path(root, git("rev-parse", "--git-common-dir", cwd=root).strip()).resolve()
    with (common / "fer-exp-save.lock").open("w") as lock_fh:
        fcntl.flock(lock_fh, fcntl.LOCK_EX)
        # New files the run made (metrics, reports, DVC's .gitignore entries) belong to the
        # experiment: without them a teammate's `dvc exp apply` + `dvc pull` is not up to date.
        new = git("ls-files", "--others", "--exclude-standard", cwd=root, check=False).splitlines()
        include = [arg for path in new for arg in ("-I", path)]
        res = dvc("exp", "save", "--force", "-n", name, *include, cwd=root, check=False)
    if res.returncode != 0:
        why = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])
        raise FerError(f"`dvc exp save -n {name}` failed in {root}: {why}")
    return name


def keep_results(ws: str | Path, experiment: str | None,
                 log: Callable[[str], None] = print) -> list[str]:
    """A deployment run works in a clone that the worker deletes after the run: its DVC outputs
    go to the project's default DVC remote (`dvc push`) and its experiment to the clone's
    `origin` (`dvc exp push`), where the team finds them (`dvc exp pull origin NAME`). Returns
    what could not be kept, for the run's log and report (the trainings themselves succeeded)."""
    problems = []
    remote = dvc("remote", "default", cwd=ws, check=False).stdout.strip()
    if not remote:
        problems.append("no default DVC remote: this run's outputs (splits, models) are not kept "
                        "once the clone is deleted; set one (`dvc remote default storage`, "
                        "docs/team-stores.md)")
    else:
        res = dvc("push", "-q", cwd=ws, check=False)
        if res.returncode != 0:
            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-5:])
            problems.append(f"dvc push to {remote} failed: {tail}")
        else:
            log(f"outputs pushed to DVC remote {remote}")
    if experiment:
        # Prefect's git_clone makes a shallow clone; DVC's push (dulwich) walks the history
        # and fails on the first missing parent with a bare commit id. Deepen it first.
        shallow = git("rev-parse", "--is-shallow-repository", cwd=ws, check=False).strip()
        git("fetch", "--quiet", *(["--unshallow"] if shallow == "true" else []), "origin",
            cwd=ws, check=False)
        res = dvc("exp", "push", "--no-cache", "origin", experiment, cwd=ws, check=False)
        if res.returncode != 0:
            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-5:])
            problems.append(f"dvc exp push origin {experiment} failed (the worker needs push "
                            f"access to the repository): {tail}")
        else:
            log(f"DVC experiment {experiment} pushed to origin (`dvc exp pull origin {experiment}`)")
    return problems
