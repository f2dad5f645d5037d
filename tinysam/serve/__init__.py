"""``tinysam serve``: the interactive web demo and the JSON API under it."""
