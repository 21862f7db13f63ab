"""A run of the stage: the stage orchestrator on top, the search and its trials, and the chain
runner that runs one chain on one source model."""
