"""The `chtsl info`, `bench` and `generate` commands."""
