"""`chtsl sweep` (Typer command; the work and every heavy import live in `train.sweep.runner`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chtsl_infer.console import check_output_file, json_on_stdout, write_json
from chtsl_infer.errors import ChtslError
from chtsl_infer.options import Force, JsonOut


def sweep_command(
    ctx: typer.Context,
    preset: Annotated[str, typer.Option(help="Recipe preset of every run (tiny, cpu60m, llama60m-c4, ...).")] = "tiny",
    methods: Annotated[str, typer.Option(help="Comma-separated methods, e.g. naive,act,chtsl.")] = "naive,act,chtsl",
    s_total: Annotated[str, typer.Option("--s-total", help="Comma-separated total sparsities, e.g. 0.9,0.8.")] = "0.9",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")] = "0,1,2",
    out: Annotated[Path | None, typer.Option(
        help="Sweep directory: one run per cell in OUT/<method>-s<s>-seed<k>/.")] = None,
    print_commands: Annotated[bool, typer.Option(
        "--print-commands", help="Print one `chtsl train` line per cell instead of running them.")] = False,
    report: Annotated[Path | None, typer.Option(
        help="Only write/print the report of the runs in this directory.")] = None,
    alternative: Annotated[str, typer.Option(help="Wilcoxon alternative: two-sided | less | greater.")] = "two-sided",
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the PNG figures of the report.")] = True,
    jobs: Annotated[int, typer.Option(help="Cells run at once, each with 1/JOBS of the CPU threads "
                                           "(OMP_NUM_THREADS if set, else the CPUs).")] = 1,
    json_out: JsonOut = None,
    force: Force = False,
) -> None:
    """Run a grid of `chtsl train` runs (methods × s_total × seeds) and report the paper's comparisons.

    Any other `chtsl train` option (e.g. --steps 1000 --eval-every 100) is applied to every run.
    Restartable: finished cells are skipped, interrupted ones resume from their last checkpoint.
    When every cell has finished, OUT/report.md, OUT/report.json and OUT/figures/ are written;
    --json writes that report (while cells are left: their states), or with --print-commands the lines.
    `--report` exits with code 1 when cells are unreadable (after writing the report).
    """
    import signal

    from train.sweep import runner as sweep

    if alternative not in sweep.ALTERNATIVES:
        raise ChtslError(f"unknown --alternative {alternative!r}; valid: {', '.join(sweep.ALTERNATIVES)}")
    check_output_file(json_out, force)
    if report is not None:
        if out is not None or print_commands or ctx.args or jobs != 1:
            raise ChtslError("--report DIR takes no grid, --out, --jobs, --print-commands or train options")
        with json_on_stdout(json_out):
            result, _ = sweep.write_report(report, alternative=alternative, figures=figures)
        write_json(result, json_out, force)
        problem = sweep.unreadable_error(result)
        if problem:
            from chtsl_infer.console import err_console

            err_console.print(f"error: {problem}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(1)
        return
    if out is None:
        raise ChtslError("--out DIR is required (the sweep directory)")
    grid = sweep.build_grid(preset, methods, s_total, seeds, list(ctx.args))
    sweep.check_jobs(jobs, len(grid.cells()))
    if print_commands:
        sweep.check_existing(grid, out)
        lines = [sweep.command_line(grid.argv(cell, out)) for cell in grid.cells()]
        with json_on_stdout(json_out):
            print("\n".join(lines))
        write_json({"commands": lines}, json_out, force)
        return
    try:
        with json_on_stdout(json_out):
            runs = sweep.run_sweep(grid, out, jobs=jobs)
            if all(r.status in sweep.FINISHED for r in runs.values()):
                result, _ = sweep.write_report(out, alternative=alternative, figures=figures)
            else:  # the cells' states so far, in the report's shape
                result = sweep.build_report(list(runs.values()), alternative)
    except KeyboardInterrupt as e:  # errors.Interrupted (SIGINT, SIGTERM) is one
        from chtsl_infer.console import err_console

        err_console.print(f"interrupted: the running cells were stopped; rerun the same command to continue "
                          f"(finished cells are kept, interrupted ones resume from their last checkpoint in "
                          f"{out})", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None
    write_json(result, json_out, force)
