"""The HTTP edge: parse, call the domain, render. Errors are mapped once, in `app.py`."""
