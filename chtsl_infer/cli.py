"""The `chtsl` command line (Typer). Every command prints one line and exits 2 on bad input (74 when
the environment fails a write: a full disk, a read-only or vanished directory).

Each command lives beside the code it drives (train/, export/, evals/, chtsl_infer/commands/bench.py…);
this module only wires them into one app, keeping heavy imports inside the commands.
"""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from chtsl_infer import omp
from chtsl_infer.commands.bench import bench_command
from chtsl_infer.commands.generate import generate_command
from chtsl_infer.console import check_output_file, console, err_console, write_json
from chtsl_infer.errors import ChtslError, WriteFailure, write_failure_reason
from chtsl_infer.model.methods import DEFAULT_METHOD, METHOD_CHOICES
from chtsl_infer.options import Force, JsonOut, context_settings
from evals.command import eval_command
from export.command import export_command
from train.command import plot_command, train_command
from train.sweep.command import sweep_command

app = typer.Typer(
    name="chtsl",
    help="Parameter-efficient LLaMA models trained with CHTsL: train, export, bench, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("info", context_settings=context_settings("info"))
def info_command(
    ctx: typer.Context,
    preset: Annotated[str, typer.Option(help="Preset name, e.g. llama60m-c4, llama130m-owt, tiny.")] = "llama60m-c4",
    s_total: Annotated[float, typer.Option("--s-total", help="Total sparsity of the linears (0.9, 0.8 or 0.7).")] = 0.9,
    method: Annotated[str, typer.Option(help=f"{METHOD_CHOICES}.")] = DEFAULT_METHOD,
    sparsity: Annotated[float | None, typer.Option(help="Override the preset's sparsity s of S.")] = None,
    rank: Annotated[int | None, typer.Option(help="Override the preset's rank r of the low-rank branch.")] = None,
    kernels: Annotated[bool, typer.Option(
        "--kernels", help="Show the CPU kernels instead: CPU, ISA, build, the settings in force and the defaults, "
                          "when and where they were tuned.")] = False,
    retune: Annotated[bool, typer.Option(
        "--retune", help="Tune the CPU kernels anew (about 20 s), then show them (implies --kernels).")] = False,
    json_out: JsonOut = None,
    force: Force = False,
) -> None:
    """Per-layer-type shapes, (s, r), parameter counts and s_total of a preset, and the bytes per link and per
    decoded token of its packed exports (fp32, bf16, int8); with --kernels, the CPU kernels and their tuning."""
    from chtsl_infer.commands.info import budget_report, budget_table, kernel_report, kernel_table, packed_table
    from chtsl_infer.model.methods import unused_options_warning
    from chtsl_infer.model.presets import build_config

    check_output_file(json_out, force)
    if kernels or retune:
        # (by name: Typer may carry its own copy of Click's ParameterSource)
        given = [f"--{name.replace('_', '-')}" for name in ("preset", "s_total", "method", "sparsity", "rank")
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if given:
            raise ChtslError(f"--kernels shows the CPU kernels, not a model: drop {', '.join(given)}")
        report = kernel_report(retune)
        if str(json_out) != "-":
            console.print(kernel_table(report))
        write_json(report, json_out, force)
        return
    config = build_config(preset, method=method, s_total=s_total, sparsity=sparsity, rank=rank)
    unused = unused_options_warning(method, [n for n, v in (("sparsity", sparsity), ("rank", rank)) if v is not None])
    if unused:
        err_console.print(f"[yellow]warning:[/] {escape(unused)}", highlight=False, soft_wrap=True)
    report = budget_report(config, preset)
    if str(json_out) != "-":
        console.print(budget_table(report))
        console.print(packed_table(report))
    for problem in report["problems"]:  # what `chtsl train` refuses
        err_console.print(f"[bold red]outside the budget:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    write_json(report, json_out, force)


app.command("train", context_settings=context_settings("train"))(train_command)
app.command("plot", context_settings=context_settings("plot"))(plot_command)
# sweep forwards the options it does not know to every `chtsl train` of its grid
app.command("sweep", context_settings=context_settings("sweep", allow_extra_args=True, ignore_unknown_options=True))(
    sweep_command)
app.command("export", context_settings=context_settings("export"))(export_command)
app.command("bench", context_settings=context_settings("bench"))(bench_command)
app.command("generate", context_settings=context_settings("generate"))(generate_command)
app.command("eval", context_settings=context_settings("eval"))(eval_command)


def _one_line(message: str) -> str:
    """`message` folded onto one line (a multi-line library message would break the convention)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def error_exit(message: str, code: int = 2) -> NoReturn:
    """Prints `error: MESSAGE` as one line on stderr and exits with `code` (2: bad input)."""
    err_console.print(f"[bold red]error:[/] {_one_line(message)}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `chtsl` script: runs the app; bad input (a `ChtslError` raised anywhere in
    the library, or a usage error Click would print as a box) becomes one line `error: ...` and exit
    code 2; a write the environment failed (`WriteFailure`, or an I/O error that reaches here) one
    line and exit code 74. Sets the OpenMP wait policy first (`omp.configure`: libgomp reads it when
    torch loads it)."""
    try:
        if "torch" not in sys.modules:  # (in-process callers, e.g. the tests, have torch loaded already)
            args = sys.argv[1:] if argv is None else argv
            omp.configure(command=next((a for a in args if not a.startswith("-")), None))
        code = app(args=argv, prog_name="chtsl", standalone_mode=False)
    except typer.TyperException as e:  # Click's usage errors: unknown option, bad value, missing argument
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `chtsl`: the help, as Click prints it
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error_exit(escape(e.format_message()) + where)
    except typer.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    except ChtslError as e:  # bad input (2), or a write the environment failed (WriteFailure: 74)
        error_exit(escape(str(e)), e.exit_code)
    except BrokenPipeError:
        raise
    except Exception as e:  # an I/O failure no command turned into its own message: still one line
        reason = write_failure_reason(e)
        if reason is None:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        error_exit(escape(f"I/O error{where}: {reason}"), WriteFailure.exit_code)
    sys.exit(code if isinstance(code, int) else 0)  # as Click's standalone mode: always SystemExit


if __name__ == "__main__":
    main()
