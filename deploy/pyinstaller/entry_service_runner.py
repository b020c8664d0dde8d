"""The bundle's ``service_runner``: the node service (``tiktrue node``; under Windows' service
manager, the service ``TiktrueWorkerService``)."""

from tiktrue.cli import bundle_main

bundle_main("node")
