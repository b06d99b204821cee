"""The `qtool` command line: a typer app over the library functions."""
