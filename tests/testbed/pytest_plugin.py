"""Placeholder until the testbed fixtures land."""
