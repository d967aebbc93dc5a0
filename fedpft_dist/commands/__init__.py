"""The handlers of the ``fedpft`` subcommands: each parses what it needs, calls the library, prints."""
