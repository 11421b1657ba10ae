"""lowmem-merge: out-of-core merging of large language models under a RAM budget."""

__version__ = "0.1.0"

from .api import merge, run_config  # noqa: E402

__all__ = ["__version__", "merge", "run_config"]
