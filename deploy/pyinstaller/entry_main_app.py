"""The bundle's ``main_app``: this PC's TikTrue in a window (``tiktrue app``)."""

from tiktrue.cli import bundle_main

bundle_main("app")
