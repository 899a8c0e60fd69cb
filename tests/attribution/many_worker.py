"""``python -m fastattr attribute-many`` for test_attribute_many.py (not collected): with
FASTATTR_TEST_KILL_RANK=r, rank r dies (os._exit) in the middle of writing its second graph."""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)

from fastattr import attribute_many  # noqa: E402

kill = os.environ.get("FASTATTR_TEST_KILL_RANK")
if kill is not None and os.environ.get("RANK") == kill:
    real, written = attribute_many.write_graph, []

    def write_graph(graph, out, pid, args, rank):
        if written:
            graph.to_pt(str(out / f"{attribute_many._TMP}{rank}-{pid}.pt"))
            os._exit(9)
        written.append(pid)
        real(graph, out, pid, args, rank)

    attribute_many.write_graph = write_graph

if __name__ == "__main__":
    sys.exit(attribute_many.main(sys.argv[1:]))
