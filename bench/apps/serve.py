"""Serve a benchmark app under exactly the uvicorn settings the gateway uses.

``python -m bench.apps.serve MODULE:ATTR --config FILE --port N``: the settings come from
:func:`gateway.ingress.server.uvicorn_config` with the same config file as the gateway's run, so the
ceilings differ from the gateway only in the app.
"""

from __future__ import annotations

import argparse
import importlib

import uvicorn

from gateway.config import load_config
from gateway.ingress.server import uvicorn_config, uvicorn_options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app", help="module:attribute of the ASGI app")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    module, _, attr = args.app.partition(":")
    app = getattr(importlib.import_module(module), attr)
    config = load_config(args.config)
    if config.server.workers > 1:
        # worker processes import the app themselves, as `gateway serve` does
        uvicorn.run(args.app, **uvicorn_options(config, host="127.0.0.1", port=args.port))
        return
    uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=args.port)).run()


if __name__ == "__main__":
    main()
