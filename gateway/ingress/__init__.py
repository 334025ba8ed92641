"""The HTTP source: the ASGI app and its routes, the sender allowlist, the uvicorn server.

``app`` builds the app (``PathDispatcher`` in front of Starlette's operational routes),
``route`` is one source's handler, ``checks`` the checks in front of it, ``state`` what the
routes share, ``sources`` the core's view of a configured source.
"""
