"""Ivy: the data-acquisition supervisor of one sensor station."""
