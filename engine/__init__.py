"""The training engine: data, models, features, distributed helpers, checkpoints and the loop."""
