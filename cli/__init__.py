"""The typer front end of rnmt (installed as the package `rnmt_cli`)."""
