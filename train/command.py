"""`chtsl train` (being built by the trainer issue)."""

from chtsl_infer.console import UserError


def train_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl train` is not available yet")


def plot_command() -> None:
    """Not available yet."""
    raise UserError("`chtsl plot` is not available yet")
