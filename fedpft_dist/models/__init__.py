"""Models: loading from local directories, FFN layouts per architecture, the proxy (sub-FM)."""
