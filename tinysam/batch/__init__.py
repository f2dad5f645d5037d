"""Many images: one job's per-image code run locally or on a Ray cluster (``tinysam[ray]``)."""

from .runner import BatchSummary, Job, run_local, run_ray

__all__ = ["BatchSummary", "Job", "run_local", "run_ray"]
