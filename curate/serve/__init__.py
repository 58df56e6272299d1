"""``curate serve``: a local web app over one output (see curate/serve/app.py)."""
