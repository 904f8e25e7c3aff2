"""The ``pergrad`` command line: ``main.py`` builds the parser, one module per subcommand."""
