"""``python -m pergrad ...`` runs the command line, like the ``pergrad`` script."""

from pergrad.cli.main import main

raise SystemExit(main())
