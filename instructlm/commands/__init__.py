"""One module per verb: `register(subparsers)` adds the parser; heavy imports happen inside the handler."""
