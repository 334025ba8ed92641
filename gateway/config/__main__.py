"""``python -m gateway.config``: print the configuration reference (docs/configuration.md)."""

from gateway.config._reference import reference_markdown

print(reference_markdown(), end="")
