"""Structured outputs: constraining what a request may generate to a schema, a regex or a grammar."""
