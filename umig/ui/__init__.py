"""``umig ui``: the lineage in the browser.

:mod:`umig.ui.api` builds the JSON the page reads (the same shapes as the CLI's ``--json``, from the
same functions); :mod:`umig.ui.server` wraps it in a small ASGI app (Starlette + uvicorn, the ``ui``
extra) that also serves the page under ``umig/ui/static/``. Both import without the extra: the
server's third-party imports sit inside its functions, so ``umig ui`` can say which extra to install.
"""

from __future__ import annotations

from umig.ui.server import create_app, running, serve

__all__ = ["create_app", "running", "serve"]
