"""Full-stage knowledge distillation of a TinySAM student from a SAM teacher (work in progress:
losses and hard prompt sampling; data, teacher cache and trainer follow)."""
