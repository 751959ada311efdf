"""codestore: short-lived, least-privilege Code Storage credentials for plain git.

This package is imported by git's helpers on every fetch and push, so it imports
nothing here: each module pulls in only what its own job needs.
"""

__version__ = "0.1.0"
