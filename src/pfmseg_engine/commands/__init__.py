"""One module per CLI subcommand, each exposing ``register(subparsers)`` and ``run(args)``."""
