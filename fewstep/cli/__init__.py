"""The ``fewstep`` command line: one module per verb, each with ``add_parser(subparsers)`` and ``run(args)``."""
