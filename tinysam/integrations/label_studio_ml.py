"""The import path label-studio-ml users were given (``TinySAMBackend`` in a model file): an
alias of ``tinysam.integrations.label_studio.ml``."""

from .label_studio.ml import TinySAMBackend, shared_backend

__all__ = ["TinySAMBackend", "shared_backend"]
