"""Filter stages: they only threshold columns that scoring stages wrote, each with its reason token.

Importing this package registers them.
"""

from filters import perplexity  # noqa: F401
