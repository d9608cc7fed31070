"""The application layer: how a person or a client starts and uses PRISM devices.

  cli.py            the `prism-edge` command line (argument tables only; commands load lazily)
  commands.py       run / generate / eval / finetune / bench;  launch.py: `prism-edge launch` and its report
  spec.py           LaunchSpec: the frozen runtime settings that give both the flags and the worker command line
  flags.py          PrismConfig <-> command-line flags;  env.py: every environment variable read, in one place
  requests.py       requests from texts and images (the one place a tokenizer's pad token is set)
  worker.py         one device process of a group: start-up and the serve loop
  cluster/          the Cluster API (rank 0): processes, start-up, heartbeat, requests, generation
  handshake.py      start-up checks;  calibrate.py: `--weights auto`
  http.py           the HTTP server;  native.py: /v1/forward, /v1/generate;  openai_api.py: the OpenAI-compatible
                    endpoints;  embeddings.py: /v1/embeddings;  textstream.py: stop strings over streamed tokens
  bench/            the benches that run device processes (schemes, runtime, tensor parallelism, hetero)

Everything here imports downward (runtime, models, eval, bench); nothing below imports from here
(tests/test_layering.py checks it).
"""
