"""The key service's domain model: plain classes and the rules over them.

Nothing here knows HTTP, SQLite or the command line. Errors are typed
(`errors.py`) and turned into status codes once, at the API edge.
"""
