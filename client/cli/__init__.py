"""The ``offramp`` command line (``offramp.client.cli.main``), one module per subcommand."""
