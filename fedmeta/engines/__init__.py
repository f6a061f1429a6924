"""Engines drive rounds; they all call the same client and server functions."""
