"""Python client and RLVR library for the Ember policy server.

    from ember import Client
    c = Client("http://127.0.0.1:8377")
    out = c.generate(prompts=["2+2="], n=4, max_tokens=8, temperature=1.0)
"""
from .client import Client, EmberError, TransportError
from .protocol import VERSION as __version__

__all__ = ["Client", "EmberError", "TransportError"]
