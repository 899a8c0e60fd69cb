"""Plumbing every op shares, importing nothing else of fastattr: the dispatch registry and backend
status (``backends``), argument checks (``checks``), the device guard (``device``), the compiled
extension and its raw-pointer encoding (``ext``), ``fastattr.info()`` (``info``), peak-memory
measurement (``memory``) and the shared record of patched attributes (``patching``)."""
