"""Running the demo under uvicorn, with a shutdown that does not wait on heavy work."""

from __future__ import annotations

import uvicorn

from .app import DemoService, create_app

# On SIGTERM/SIGINT, requests still running get this long to finish; an everything run is told
# to stop at once (it stops within one batch of prompts), an encode finishes within seconds.
SHUTDOWN_GRACE_S = 5


class StoppingServer(uvicorn.Server):
    """uvicorn's server, telling the service to abandon heavy work when asked to exit."""

    def __init__(self, config: uvicorn.Config, service: DemoService) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.stop()
        super().handle_exit(sig, frame)


def run(service: DemoService, host: str, port: int, log_level: str = "warning") -> None:
    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    StoppingServer(config, service).run()
