"""The builders behind one door: the only code that speaks to the Docker engine."""
