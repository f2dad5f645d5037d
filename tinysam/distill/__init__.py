"""Full-stage knowledge distillation of a TinySAM student from a SAM teacher (docs/method.md §1).

``data`` (SA-1B folders and tar shards, rank-aware sampler), ``synthetic`` (SA-1B-format test
data), ``teacher_cache`` (stored teacher embeddings), ``losses``, ``prompts`` (hard prompt
sampling), ``trainer`` (the loop, DDP, exact resume), ``models`` (students, teachers and the
small demo models), ``evaluate`` (student-teacher agreement), ``demo`` and ``cli`` (the
``tinysam distill`` command).
"""
