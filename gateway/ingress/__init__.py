"""The HTTP source: the ASGI app and its routes, the sender allowlist, the uvicorn server."""
