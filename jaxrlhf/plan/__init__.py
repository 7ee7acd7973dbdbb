"""The memory planner: bytes per device of every role of a run from config.json files alone,
`remat: auto`, and ahead-of-time dry runs that compile the real programs from shapes."""
