"""Full-stage knowledge distillation of a TinySAM student from a SAM teacher (METHOD.md §1).

In place: ``data`` (SA-1B folders and tar shards, rank-aware sampler), ``synthetic`` (SA-1B-format
test data), ``teacher_cache`` (stored teacher embeddings), ``losses``, ``prompts`` (hard prompt
sampling), ``trainer`` (the loop, DDP, exact resume) and ``models`` (small demo models). Still to
come: the ``tinysam distill`` command (cache-teacher, train with YAML config, demo) and the
demo's ablation.
"""
