"""curate's version (pyproject.toml's ``version``), in a module of its own: the modules that record it
(incremental fingerprints, the report's footer) import it from here, not from the package above them."""

__version__ = "0.1.0"
