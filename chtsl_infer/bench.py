"""`chtsl bench` (being built by the inference runtime issue)."""

from chtsl_infer.console import UserError


def bench_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl bench` is not available yet")
