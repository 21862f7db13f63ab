"""The built-in plugins of pipeline-stage.

Each module is an ordinary plugin written with the public ``@hookimpl`` API, exactly as a
third-party package would write it; ``pipeline_stage.host.plugin_host.DEFAULT_PLUGINS`` registers them.
"""
