"""Operator commands that are not a pipeline: check-config and replay."""
