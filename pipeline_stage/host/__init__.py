"""The plugin host: the pluggy manager, the built-in and installed plugins, and what they registered."""
