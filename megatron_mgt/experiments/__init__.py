"""Runners of the evaluation protocol (spec section 3); entry point `mgt-experiment` (cli.py)."""
