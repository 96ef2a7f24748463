"""Side-by-side speed and memory measurements; each module is also a script (see README.md)."""
