"""What a request sends back to rank 0 (torch-free, so the command line lists them without importing torch).

  all     every position's outputs, like the model / simulate
  pooled  pooler / classifier outputs only (the pooler reads position 0, which lives on rank 0)
  last    each sequence's last real position: the next-token logits of an LM
  mean    the mean over each sequence's real positions: sentence embeddings
"""

OUTPUT_MODES = ("all", "pooled", "last", "mean")

# How new tokens see the earlier devices' positions when generating (runtime/decode.py has the details).
DECODE_MODES = ("auto", "local", "handoff", "distributed")
