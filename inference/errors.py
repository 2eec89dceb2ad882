"""Errors of the inference layer. Each message names the object (file, model, server) and the cause."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of all inference-layer errors."""


class SpecError(InferenceError):
    """config_inference.json is missing, malformed, or holds a value out of range."""


class InputVolumeError(InferenceError):
    """The input volume cannot be used: missing, ambiguous, unreadable, or not 3-D."""


class BackendUnavailable(InferenceError):
    """The backend cannot be reached or started (Triton down, runtime missing). May succeed later."""


class ModelMismatch(InferenceError):
    """The served model does not match the spec: missing, or tensor names, shapes or data types differ."""
