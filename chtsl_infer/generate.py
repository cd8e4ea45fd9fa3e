"""`chtsl generate` (being built by the inference runtime issue)."""

from chtsl_infer.console import UserError


def generate_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl generate` is not available yet")
