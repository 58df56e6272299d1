"""Built-in scoring/processing stages (one per module).  Importing this package registers them."""

from curate.stages import download  # noqa: F401
from curate.stages import unique_uid  # noqa: F401
