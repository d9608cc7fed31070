"""`python -m prism_edge.worker ...`: one device process, the entry point torchrun starts.

    torchrun --nproc-per-node 2 -m prism_edge.worker --model minilm --cr 8
    torchrun --nnodes 2 --node-rank K --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
        -m prism_edge.worker --model minilm --serve 0.0.0.0:8000

Same flags as `prism-edge worker`; rank, world size and master come from torchrun's environment.
"""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]], hard_exit=True))
