"""`herd eval`: evaluations of a model (niah.py: needle in a haystack)."""
