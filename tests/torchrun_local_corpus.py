"""`chargen train` under torchrun, with "tinyshakespeare" served by a test's local HTTP server.

Run by tests/test_distributed.py as torchrun's script: every rank points the fetcher at
CHARGEN_TEST_CORPUS_URL (checked against CHARGEN_TEST_CORPUS_SHA256), then runs the real command.
"""

import os
import sys

from chargen.cli import main
from training import data

data.TINY_SHAKESPEARE.update(url=os.environ["CHARGEN_TEST_CORPUS_URL"], sha256=os.environ["CHARGEN_TEST_CORPUS_SHA256"])
raise SystemExit(main(sys.argv[1:]))
