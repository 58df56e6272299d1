"""Built-in scoring/processing stages (one per module).  Importing this package registers them."""

from curate.stages import download  # noqa: F401
from curate.stages import unique_uid  # noqa: F401
from curate.stages import caption_perplexity  # noqa: F401
from curate.stages import recaption  # noqa: F401
from curate.stages import phash  # noqa: F401
from curate.stages import dedup_exact  # noqa: F401
from curate.stages import dedup_phash  # noqa: F401
from curate.stages import dedup_semantic  # noqa: F401
from curate.stages import clip_embed  # noqa: F401
from curate.stages import language_id  # noqa: F401
from curate.stages import embedding_head  # noqa: F401
from curate.stages import density_prune  # noqa: F401
from curate.stages import image_cluster  # noqa: F401
