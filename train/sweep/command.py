"""`chtsl sweep` (Typer command; the work and every heavy import live in `train.sweep.runner`)."""

from __future__ import annotations

import typer

from chtsl_infer.errors import ChtslError


def sweep_command(
    ctx: typer.Context,
    preset: str = typer.Option("tiny", help="Recipe preset of every run (tiny, cpu60m, llama60m-c4, ...)."),
    methods: str = typer.Option("naive,act,chtsl", help="Comma-separated methods, e.g. naive,act,chtsl."),
    s_total: str = typer.Option("0.9", "--s-total", help="Comma-separated total sparsities, e.g. 0.9,0.8."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds, e.g. 0,1,2."),
    out: str | None = typer.Option(None, help="Sweep directory: one run per cell in OUT/<method>-s<s>-seed<k>/."),
    print_commands: bool = typer.Option(False, "--print-commands",
                                        help="Print one `chtsl train` line per cell instead of running them."),
    report: str | None = typer.Option(None, help="Only write/print the report of the runs in this directory."),
    alternative: str = typer.Option("two-sided", help="Wilcoxon alternative: two-sided | less | greater."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the PNG figures of the report."),
) -> None:
    """Run a grid of `chtsl train` runs (methods × s_total × seeds) and report the paper's comparisons.

    Any other `chtsl train` option (e.g. --steps 1000 --eval-every 100) is applied to every run.
    Restartable: finished cells are skipped, interrupted ones resume from their last checkpoint.
    When every cell has finished, OUT/report.md, OUT/report.json and OUT/figures/ are written.
    """
    from pathlib import Path

    from train.sweep import runner as sweep

    if alternative not in sweep.ALTERNATIVES:
        raise ChtslError(f"unknown --alternative {alternative!r}; valid: {', '.join(sweep.ALTERNATIVES)}")
    if report is not None:
        if out is not None or print_commands or ctx.args:
            raise ChtslError("--report DIR takes no grid, --out, --print-commands or train options")
        sweep.write_report(Path(report), alternative=alternative, figures=figures)
        return
    if out is None:
        raise ChtslError("--out DIR is required (the sweep directory)")
    grid = sweep.build_grid(preset, methods, s_total, seeds, list(ctx.args))
    out_dir = Path(out)
    if print_commands:
        sweep.check_existing(grid, out_dir)
        for cell in grid.cells():
            print(sweep.command_line(grid.argv(cell, out_dir)))
        return
    try:
        runs = sweep.run_sweep(grid, out_dir)
    except KeyboardInterrupt:
        from chtsl_infer.console import err_console

        err_console.print(f"interrupted: rerun the same command to continue (finished cells are kept, the "
                          f"interrupted one resumes from its last checkpoint in {out_dir})", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(130) from None
    if all(r.status in ("done", "diverged") for r in runs.values()):
        sweep.write_report(out_dir, alternative=alternative, figures=figures)
