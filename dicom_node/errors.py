"""The two ways a stage can fail, so the caller knows whether to try again."""

from __future__ import annotations


class NodeError(Exception):
    """Base of the node's own errors; the message names the object and the cause."""


class Rejected(NodeError):
    """Permanent: the input itself is unusable (bad dataset, unsupported geometry, undecodable pixels).

    Retrying cannot help; the object is kept and recorded with this reason.
    """


class Transient(NodeError):
    """Temporary: a peer is down, a timeout, a full disk. The same work may succeed later."""
