"""Training on embedded data with per-example statistics at every step: config, data, models, loop."""
