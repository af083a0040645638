"""`metronome bench`: an Artificial-Analysis-style load generator for OpenAI-compatible servers.

Modules: `workloads` (token budgets, unique prompts over `corpus.txt`), `client` (streaming
requests, timestamps), `metrics` (per-request figures, percentiles), `runner` (interleaved
concurrency sweep), `peers` (starting metronome / llama.cpp / transformers servers),
`hf_server` (the transformers baseline server), `report` (JSON per `schema.json`, Markdown,
PNG plots), `progress` (rich bar), `cli` (the `bench` subcommand).
"""
