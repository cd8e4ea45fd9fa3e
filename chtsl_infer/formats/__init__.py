"""Model directories and the packed format: reading, validating and writing checkpoints and exports."""
