"""Shared foundations: the configuration, named errors, atomic files and directory swaps,
JSON I/O, dotted keys, the model contract."""
