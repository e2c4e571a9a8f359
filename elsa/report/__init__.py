"""The `elsa` report program: per-job usage from the store."""
