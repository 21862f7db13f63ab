"""The contract: what a plugin implements and what the layers above agree on (steps, metrics, data,
search moves, gates, the typed report, hookspecs, errors). It imports nothing above it and nothing
heavy; plugins import it through :mod:`pipeline_stage`."""
