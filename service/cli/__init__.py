"""The `trtforge` command line (entry point :func:`service.cli.main.main`)."""
