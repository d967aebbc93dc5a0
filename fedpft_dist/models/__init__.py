"""Models: loading from local directories, FFN layouts per architecture, the proxy (sub-FM), adapters.

Importing this package registers the proxy architectures (model types ``fedpft_<type>``) with
transformers' Auto classes, so a saved proxy reloads with ``AutoModel.from_pretrained(proxy_dir)``.
"""
from . import proxy_arch  # noqa: F401  (registers the fedpft_* architectures)
