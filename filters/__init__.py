"""Filter stages: they only threshold columns that scoring stages wrote, each with its reason token.

Importing this package registers them.
"""

from curate.filters import perplexity  # noqa: F401
from curate.filters import clip_score  # noqa: F401
from curate.filters import caption  # noqa: F401
from curate.filters import language  # noqa: F401
from curate.filters import image_size  # noqa: F401
from curate.filters import aspect_ratio  # noqa: F401
from curate.filters import score  # noqa: F401
from curate.filters import cluster  # noqa: F401
