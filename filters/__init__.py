"""Filter stages: they only threshold columns that scoring stages wrote, each with its reason token.

Importing this package registers them.
"""

from filters import perplexity  # noqa: F401
from filters import clip_score  # noqa: F401
from filters import caption  # noqa: F401
from filters import language  # noqa: F401
from filters import image_size  # noqa: F401
from filters import aspect_ratio  # noqa: F401
