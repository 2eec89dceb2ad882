"""DICOM side of the node: DIMSE service, durable spool, series tracking, jobs and export.

Nothing in this package knows about models; it hands volumes to :mod:`inference` and gets label images back.
"""

__version__ = "0.1.0"
