"""Command-line tools besides `moxy` itself."""
