"""`chtsl export` (being built by the export issue)."""

from chtsl_infer.console import UserError


def export_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl export` is not available yet")
