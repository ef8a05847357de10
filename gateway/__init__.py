"""An API key gateway: authenticates `X-API-KEY` against udata's `api_token` collection."""

__version__ = "0.1.0"
