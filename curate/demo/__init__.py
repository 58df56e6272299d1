"""Offline demo corpus: a deterministic image-text site built from scikit-image's photos, and a local HTTP server for it."""
