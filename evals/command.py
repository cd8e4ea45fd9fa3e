"""`chtsl eval` (being built by the eval issue)."""

from chtsl_infer.console import UserError


def eval_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl eval` is not available yet")
