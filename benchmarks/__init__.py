"""Benchmarks of efficientvit_det (not part of the installed package).

Run from the repository root: ``python -m benchmarks SUBCOMMAND [...]``; see ``__main__.py``.
"""
