"""Command-line programs: each runs as `python -m tools.NAME` and imports the library (utils/); nothing in utils/
imports them."""
