"""The offline bundle: every file setup needs in one folder, for a machine with no package index.

A manifest lists each file with its sha256 and what it is for. `manifest`, `problems`, `verify`, `parts` and
`__main__` use the standard library only: an air-gapped machine checks and joins a bundle with the bare Python
that is about to make the environment.
"""
