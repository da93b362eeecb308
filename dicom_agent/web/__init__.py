"""The results browser and the health endpoints: a small Starlette app in the agent process.

Server-rendered pages (Jinja2 templates, one stylesheet, no JavaScript) over the state database
and the ``out/`` folder: the studies list, a study's results, "audit one image", the queue. The
same server answers ``/healthz``, ``/readyz`` and ``/metrics``. Every page carries the
research-only banner; patient name and ID appear only with ``web.show_patient_identity``.

One module per page (:data:`dicom_agent.web.app.PAGES`); a new page is a module with ``ROUTES``
and ``NAV`` added to that tuple. See docs/browser.md.
"""

from dicom_agent.web.app import create_app
from dicom_agent.web.server import WebServer

__all__ = ["WebServer", "create_app"]
