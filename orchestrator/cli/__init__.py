"""The ``medtriage`` command line (``main``) and its command groups, one module each."""
