"""The application layer: the command line and the HTTP server, on top of everything else.

  cli.py            the `prism-edge` command line (argument tables only; commands load lazily)
  commands.py       run / generate / eval / finetune / bench
  launch.py         `prism-edge launch` (local device processes) and `prism-edge worker` (one device of a group)
  report.py         what a request's result looks like on the terminal
  serve/            the HTTP server (http.py), /v1/forward and /v1/generate (native.py), the OpenAI-compatible
                    endpoints (openai_api.py, embeddings.py), stop strings over streamed tokens (textstream.py)

Everything here imports downward (cluster, bench, eval, runtime, models); nothing imports from here
(tests/test_layering.py checks it).
"""
