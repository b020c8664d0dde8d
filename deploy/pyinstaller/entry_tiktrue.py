"""The bundle's ``tiktrue``: the command line (``tiktrue --help``)."""

from tiktrue.cli import bundle_main

bundle_main()
