"""`chtsl sweep`: a grid of training runs, its report and figures."""
