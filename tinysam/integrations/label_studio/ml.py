"""For ``label-studio-ml`` users: ``TinySAMBackend``, a ``LabelStudioMLBase`` subclass, so its
server (``label_studio_ml.api.init_app``, ``label-studio-ml start``) serves tinysam.

label-studio-ml makes a new model object per request, so the predictor, its embedding cache
and the image reader live in one shared ``LabelStudioBackend``, built on first use from the
environment: ``TINYSAM_CHECKPOINT`` (or ``TINYSAM_BACKEND=onnx`` with ``TINYSAM_ONNX_DIR``),
``TINYSAM_THREADS``, ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (else what Label Studio
sends in /setup), ``TINYSAM_ALLOW_HOSTS`` (comma-separated image hosts), ``TINYSAM_PREANNOTATE=1``.

``tinysam label-studio`` serves the same predictions without label-studio-ml (whose 2.x
releases are installed from its git repository, not PyPI) and with one-line 4xx errors.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from label_studio_ml.model import LabelStudioMLBase

from .backend import (
    MODEL_VERSION,
    ImageSource,
    LabelStudioBackend,
    parse_labeling_config,
)

_shared: LabelStudioBackend | None = None
_lock = threading.Lock()


def shared_backend() -> LabelStudioBackend:
    global _shared
    with _lock:
        if _shared is None:
            from ...backends import PredictorSpec
            from ...serve.service import DemoService

            predictor = PredictorSpec.from_env().load()
            hosts = os.environ.get("TINYSAM_ALLOW_HOSTS", "")
            images = ImageSource(
                os.environ.get("LABEL_STUDIO_URL"),
                os.environ.get("LABEL_STUDIO_API_KEY"),
                tuple(h.strip() for h in hosts.split(",") if h.strip()),
            )
            _shared = LabelStudioBackend(
                DemoService(predictor),
                images,
                preannotate=os.environ.get("TINYSAM_PREANNOTATE") == "1",
            )
        return _shared


class TinySAMBackend(LabelStudioMLBase):
    """Brush masks from smart keypoints and rectangles (see ``label_studio``)."""

    def setup(self) -> None:
        self.set("model_version", MODEL_VERSION)

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list:
        backend = shared_backend()
        config = parse_labeling_config(self.label_config)
        predictions = []
        for task in tasks:
            prediction = backend.predict_task(task, config, context)
            if prediction is not None:
                predictions.append(prediction)
        return predictions
