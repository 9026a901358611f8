"""One module per ``mqpolicy`` subcommand; :mod:`mqpolicy.cli` builds the parser and dispatches
to them."""
