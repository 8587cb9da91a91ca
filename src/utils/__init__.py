"""Building blocks used by the main loop, the procedures and the backends."""
