"""Label Studio: ``backend`` (the ML backend on serve's service: image downloads, prompts from
Label Studio's regions, brush RLE answers, pre-annotation), ``app`` (its HTTP API, served by
``tinysam label-studio``) and ``ml`` (``TinySAMBackend`` for label-studio-ml's own server)."""
