"""Thin Hydra entry points: parse the command line into a typed config and call one function."""
